"""dm-audit: find and fix bad labels with derivative manipulation.

    >>> from dm_audit import find_label_issues, LabelAuditor  # doctest: +SKIP

The Python API (`dm_audit.api`) is imported on first use, so that the command line, which
imports this package, starts without scikit-learn or torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LabelAuditor", "find_label_issues"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dm_audit import api

        return getattr(api, name)
    raise AttributeError(f"module 'dm_audit' has no attribute {name!r}")
