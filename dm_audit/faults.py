"""A testing hook that kills the process at a named point, exactly as a crash would.

`kill_point` sends SIGKILL to the current process when the environment variable
``DM_AUDIT_KILL_AT`` names the point it is called with, and does nothing otherwise (nor where
SIGKILL does not exist). The fault tests use it to stop an audit at a known point and check that
the next run resumes to the same report and that no half-written report is ever visible. Points:
``probe:epoch:N``, ``audit:epoch:N``, ``retrain:epoch:N`` (after epoch N's checkpoint),
``scoring`` (scores computed, not yet saved), ``report`` (first report file staged) and
``report:commit`` (first report file moved into the output folder).
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_ENV", "kill_point"]

KILL_ENV = "DM_AUDIT_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process when ``DM_AUDIT_KILL_AT`` equals `name`; inert otherwise."""
    if os.environ.get(KILL_ENV) == name and hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
