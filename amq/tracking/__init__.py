"""Metric loggers (experiment tracking).

Importing this package registers the `amq_sweep_group` resolver used by conf/logger/wandb.yaml.
"""

from amq.tracking import run_identity  # noqa: F401  (registers the resolver)
from amq.tracking.report import RUN_ARTIFACTS, artifact_paths, summary_values

__all__ = ["RUN_ARTIFACTS", "artifact_paths", "summary_values"]
