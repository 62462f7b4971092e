"""Artifacts: the store, content keys, manifests, lineage and tracking.

Light to import: no torch, no prefect, no mlflow at module level.
"""
