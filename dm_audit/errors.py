"""Exceptions that carry a message a user can act on.

The CLI maps every `DMAuditError` to exit status 2 and prints its message, so a message must name
the problem precisely: the file, the column, the row or the label at fault.
"""

from __future__ import annotations


class DMAuditError(Exception):
    """Base class of every error dm-audit raises on purpose."""


class DataError(DMAuditError, ValueError):
    """The input data is unusable: a missing column, a bad value, an unreadable file."""


class ConfigError(DMAuditError, ValueError):
    """An option or combination of options is invalid."""
