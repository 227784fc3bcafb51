"""Dagster definitions for the dm-audit pipeline.

The code location is `pipelines.definitions` (``uv run dagster dev -m pipelines.definitions``).
Modules: `assets` (one asset per audit stage), `checks`, `jobs`, `schedules`, `sensors`,
`resources`, `config`, `storage` (the IO manager) and `metadata` (UI tables and plots).
"""
