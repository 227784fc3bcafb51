"""Dagster definitions for the dm-audit pipeline."""
