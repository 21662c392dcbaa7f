"""Experiment tracking (`training.tracking`): MLflow or Weights & Biases, where users already look.

Hand-written glue; the logging itself is MLflow's / W&B's. Two halves:

- the trainer logs through its own integration: `axolotl_keys` gives Axolotl's config keys
  (`mlflow_tracking_uri`, `mlflow_experiment_name`, `mlflow_run_name`; `wandb_project`,
  `wandb_entity`, `wandb_name`), `trl_report_to` / `trl_env` give TRL's `report_to` and the
  environment its callbacks read;
- `log_point` logs what stepwise measured afterwards (eval metrics, teacher cost, data fraction)
  to the same run: for MLflow the run is opened first (`open_mlflow_run`) and its id handed to the
  trainer through `MLFLOW_RUN_ID`, which transformers' MLflowCallback resumes instead of starting
  a new run; for W&B through `WANDB_RUN_ID` with `resume=allow`.

MLflow's file store (`file:./mlruns`) is in maintenance mode in MLflow 3 and refuses to open
unless `MLFLOW_ALLOW_FILE_STORE=true` is set; a server or `sqlite:///` URI needs nothing.
"""

from __future__ import annotations

import os
from typing import Any

from stepwise.recipe import TrackingSpec


def axolotl_keys(tracking: TrackingSpec, run_name: str) -> dict[str, Any]:
    """Axolotl's own config keys for the tracker (its schema: axolotl.utils.schemas.integrations)."""
    if tracking.mlflow:
        return {"mlflow_tracking_uri": tracking.mlflow.tracking_uri,
                "mlflow_experiment_name": tracking.mlflow.experiment, "mlflow_run_name": run_name}
    if tracking.wandb:
        keys: dict[str, Any] = {"wandb_project": tracking.wandb.project, "wandb_name": run_name}
        if tracking.wandb.entity:
            keys["wandb_entity"] = tracking.wandb.entity
        return keys
    return {}


def trl_report_to(tracking: TrackingSpec) -> list[str]:
    """TRL/transformers `report_to` for the tracker (empty: no integration)."""
    return ["mlflow"] if tracking.mlflow else ["wandb"] if tracking.wandb else []


def trl_env(tracking: TrackingSpec) -> dict[str, str]:
    """The environment transformers' MLflow / W&B callbacks read (TRL has no config keys of its own)."""
    if tracking.mlflow:
        return {"MLFLOW_TRACKING_URI": tracking.mlflow.tracking_uri,
                "MLFLOW_EXPERIMENT_NAME": tracking.mlflow.experiment}
    if tracking.wandb:
        env = {"WANDB_PROJECT": tracking.wandb.project}
        if tracking.wandb.entity:
            env["WANDB_ENTITY"] = tracking.wandb.entity
        return env
    return {}


def open_mlflow_run(tracking: TrackingSpec, run_name: str, run_id: str | None = None) -> str:
    """The MLflow run a point logs to: `run_id` when it still exists (a restarted point), else a new
    run named `run_name` in the recipe's experiment. Returns its id."""
    import mlflow
    from mlflow.tracking import MlflowClient

    assert tracking.mlflow is not None
    client = MlflowClient(tracking_uri=tracking.mlflow.tracking_uri)
    if run_id:
        try:
            return client.get_run(run_id).info.run_id
        except mlflow.exceptions.MlflowException:
            pass  # the store was reset: a new run
    exp = client.get_experiment_by_name(tracking.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(tracking.mlflow.experiment)
    return client.create_run(exp_id, run_name=run_name).info.run_id


def wandb_run_id(run_id: str | None = None) -> str:
    """The W&B run id a point logs to: `run_id` (a restarted point), else a new one, chosen before
    the trainer starts so its callback (WANDB_RUN_ID) and `log_point` write to the same run."""
    import secrets
    import string

    return run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_env(tracking: TrackingSpec, run_id: str | None) -> dict[str, str]:
    """Environment for the training process so its tracker callback writes to the point's run."""
    if tracking.mlflow and run_id:
        return {"MLFLOW_RUN_ID": run_id}
    if tracking.wandb and run_id:
        return {"WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow"}
    return {}


def log_point(tracking: TrackingSpec, run_name: str, run_id: str | None, metrics: dict[str, float],
              params: dict[str, Any]) -> str | None:
    """Log a point's measured metrics and its parameters to its tracker run; returns the run id."""
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if tracking.mlflow:
        from mlflow.tracking import MlflowClient

        run_id = open_mlflow_run(tracking, run_name, run_id)
        client = MlflowClient(tracking_uri=tracking.mlflow.tracking_uri)
        for k, v in metrics.items():
            client.log_metric(run_id, k, v)
        existing = client.get_run(run_id).data.params
        for k, v in params.items():
            if k not in existing:  # MLflow params are write-once; the trainer may have logged some
                client.log_param(run_id, k, v)
        client.set_tag(run_id, "stepwise.point", run_name)
        # the trainer's callback renames the run after its own run_name (Axolotl: the config name,
        # the same for every point): the point's name goes back on
        client.set_tag(run_id, "mlflow.runName", run_name)
        client.set_terminated(run_id)
        return run_id
    if tracking.wandb:
        import wandb  # optional: `pip install wandb`

        # create_new: a run still active in this process (a caller's own, or one left open by an
        # error) would otherwise be returned by wandb.init and get the point's metrics
        run = wandb.init(project=tracking.wandb.project, entity=tracking.wandb.entity, name=run_name,
                         id=run_id or os.environ.get("WANDB_RUN_ID"), resume="allow", config=params,
                         reinit="create_new")
        try:
            run.log(metrics)
            # also the summary: offline, this process's records sync as a second part of the run,
            # whose history steps restart at 0, below the trainer's; the summary is kept either way
            run.summary.update(metrics)
            return run.id
        finally:
            run.finish()
    return None
