"""Artifacts: the store, content keys, lineage and tracking. Light to import (no torch, no prefect)."""
