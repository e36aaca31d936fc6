"""MLflow tracking for `train` (DESIGN §7): params flat, every loss term and learning rate per step."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline import config

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else a SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


class Tracker:
    """One MLflow run per `train`; a resumed run continues the run it started."""

    def __init__(self, params: config.Params, run_name: str = "train"):
        self.params, self.run_name, self.run_id = params, run_name, None

    def start(self, run_id: str | None, params: config.Params, preflight: dict) -> None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment(params.mlflow.experiment)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.run_name)
        self.run_id = run.info.run_id
        if not run_id:
            flat = {k: str(v) for k, v in config.flatten(params).items() if k.split(".")[0] in ("train", "model", "data")}
            mlflow.log_params(flat)
            mlflow.log_dict(preflight, "preflight.json")

    def log_step(self, row: dict) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in row.items() if k.startswith(("loss/", "lr/"))}, step=int(row["step"]))

    def log_metrics(self, metrics: dict, step: int) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def finish(self, metrics: dict, models: Path) -> None:
        import mlflow

        mlflow.log_dict(metrics, "train_metrics.json")
        mlflow.log_artifact(str(models / "train_steps.csv"))
        mlflow.log_artifacts(str(models / "adapter"), artifact_path="adapter")
        mlflow.end_run()
