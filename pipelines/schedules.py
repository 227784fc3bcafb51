"""The recurring audit: a schedule for `audit_job`.

``DM_AUDIT_SCHEDULE_CRON`` sets the cron expression (default ``0 2 * * *``, daily at 02:00),
``DM_AUDIT_SCHEDULE_TIMEZONE`` its time zone (default UTC) and ``DM_AUDIT_SOURCE`` the source the
scheduled run audits (default: the dataset asset's own default, the built-in digits). The
schedule starts stopped, since it trains a model every day: turn it on in the UI (Automation) or
with ``dagster schedule start audit_schedule -m pipelines.definitions``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import dagster as dg

from pipelines.jobs import audit_job

__all__ = ["DEFAULT_CRON", "audit_schedule", "build_audit_schedule"]

DEFAULT_CRON = "0 2 * * *"


def build_audit_schedule(env: Mapping[str, str] | None = None) -> dg.ScheduleDefinition:
    """The audit schedule configured from environment variables.

    Parameters
    ----------
    env : mapping, optional
        Environment to read (default ``os.environ``).

    Raises
    ------
    ValueError
        If ``DM_AUDIT_SCHEDULE_CRON`` is not a valid cron expression.
    """
    env = os.environ if env is None else env
    cron = env.get("DM_AUDIT_SCHEDULE_CRON", DEFAULT_CRON).strip()
    source = env.get("DM_AUDIT_SOURCE")
    run_config = {"ops": {"dataset": {"config": {"source": source}}}} if source else None
    try:
        return dg.ScheduleDefinition(
            name="audit_schedule",
            job=audit_job,
            cron_schedule=cron,
            execution_timezone=env.get("DM_AUDIT_SCHEDULE_TIMEZONE", "UTC"),
            run_config=run_config,
            default_status=dg.DefaultScheduleStatus.STOPPED,
            description="Recurring audit (cron from DM_AUDIT_SCHEDULE_CRON).",
        )
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(
            f"DM_AUDIT_SCHEDULE_CRON={cron!r} is not a valid cron expression: {exc}"
        ) from exc


audit_schedule = build_audit_schedule()
