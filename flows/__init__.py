"""Flows: recipe parsing, planning and the Prefect wiring.

Light to import: no torch, no prefect (flows.run imports prefect; only `posttrain run` loads it).
"""
