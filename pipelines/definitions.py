"""The Dagster code location of dm-audit: ``dagster dev -m pipelines.definitions``.

Assets (`pipelines.assets`), their checks (`pipelines.checks`), the audit and relabel jobs
(`pipelines.jobs`), data-parallel training launched with torchrun through Dagster Pipes
(`pipelines.distributed`, its own asset group and job), the recurring schedule
(`pipelines.schedules`), the file sensors (`pipelines.sensors`) and the resources
(`pipelines.resources`, `pipelines.storage`).

Environment variables read when the definitions load: ``DM_AUDIT_OUTPUT_ROOT`` (default
``data/runs``), ``DM_AUDIT_DEVICE`` (default ``auto``), ``DM_AUDIT_EXECUTOR`` (default
``in_process``: see `DEFAULT_EXECUTOR`), ``DM_AUDIT_SCHEDULE_CRON``,
``DM_AUDIT_SCHEDULE_TIMEZONE`` and ``DM_AUDIT_SOURCE``; the sensors read
``DM_AUDIT_INCOMING_DIR``, ``DM_AUDIT_REVIEWS_DIR`` and ``DM_AUDIT_SETTLE_SECONDS`` at each tick.
"""

from __future__ import annotations

import importlib
import os

import dagster as dg

from pipelines.assets import AUDIT_ASSETS
from pipelines.checks import AUDIT_CHECKS
from pipelines.distributed import distributed_model, distributed_train_job
from pipelines.jobs import audit_job, relabel_job
from pipelines.resources import AuditRuntime, AuditSettings, runtime_from_env
from pipelines.schedules import audit_schedule
from pipelines.sensors import new_dataset_sensor, reviews_sensor
from pipelines.storage import AuditIOManager

__all__ = ["DEFAULT_EXECUTOR", "EXECUTORS", "build_resources", "defs", "executor_from_name"]

#: Every step of a run in one process. A step in a process of its own pays the imports of torch,
#: scikit-learn and faiss again (25-40 s each on two cores, for 13 steps), and the audit's steps
#: form a chain that cannot run side by side anyway; ``multiprocess``, ``k8s`` or ``celery``
#: (``DM_AUDIT_EXECUTOR``) spread the steps where that pays.
DEFAULT_EXECUTOR = "in_process"

#: ``DM_AUDIT_EXECUTOR`` values: (module, attribute, package that provides it).
EXECUTORS: dict[str, tuple[str, str, str]] = {
    "multiprocess": ("dagster", "multiprocess_executor", "dagster"),
    "in_process": ("dagster", "in_process_executor", "dagster"),
    # One Kubernetes pod per step; needs a K8s run launcher (the Dagster Helm chart).
    "k8s": ("dagster_k8s", "k8s_job_executor", "dagster-k8s"),
    # Steps as Celery tasks on a broker; workers run `dagster-celery worker start`.
    "celery": ("dagster_celery", "celery_executor", "dagster-celery"),
}


def executor_from_name(name: str) -> dg.ExecutorDefinition:
    """The executor named by ``DM_AUDIT_EXECUTOR``.

    Steps exchange results through files under the output root (`AuditIOManager`), so with
    ``k8s`` or ``celery`` the output root must be a file system every worker mounts.

    Raises
    ------
    ValueError
        For an unknown name, or an executor whose package is not installed.
    """
    if name not in EXECUTORS:
        raise ValueError(f"DM_AUDIT_EXECUTOR={name!r} is not one of {sorted(EXECUTORS)}")
    module, attribute, package = EXECUTORS[name]
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as exc:
        raise ValueError(
            f"DM_AUDIT_EXECUTOR={name!r} needs the package {package} (`uv add {package}`)"
        ) from exc


def build_resources(runtime: AuditRuntime | None = None) -> dict[str, object]:
    """The resources every asset and check needs, sharing one `AuditRuntime`.

    Parameters
    ----------
    runtime : AuditRuntime, optional
        Output root and device; default from ``DM_AUDIT_OUTPUT_ROOT`` and ``DM_AUDIT_DEVICE``.
    """
    runtime = runtime_from_env() if runtime is None else runtime
    return {
        "runtime": runtime,
        "audit_settings": AuditSettings(),
        "io_manager": AuditIOManager(runtime=runtime),
        # Launches torchrun for `distributed_model` (Dagster Pipes).
        "pipes_subprocess_client": dg.PipesSubprocessClient(),
    }


defs = dg.Definitions(
    assets=[*AUDIT_ASSETS, distributed_model],
    asset_checks=AUDIT_CHECKS,
    jobs=[audit_job, relabel_job, distributed_train_job],
    schedules=[audit_schedule],
    sensors=[new_dataset_sensor, reviews_sensor],
    resources=build_resources(),
    executor=executor_from_name(os.environ.get("DM_AUDIT_EXECUTOR", DEFAULT_EXECUTOR)),
)
