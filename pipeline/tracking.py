"""MLflow (docs/design.md §7): the tracking URI and server check, the experiment, the registry helpers, and the
`train` run (params flat, every loss term and learning rate per step)."""
from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from pipeline import config
from pipeline.errors import InputError, ServiceUnavailable

DEFAULT_URI = "sqlite:///mlflow.db"
_checked: set[str] = set()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else a SQLite file in the working directory. A tracking server (http[s])
    is checked once per process before anything is logged: unreachable -> ServiceUnavailable (exit 3,
    retried by the DAGs), credentials refused -> InputError (exit 2), so nothing is half-logged."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    if uri.startswith(("http://", "https://")) and uri not in _checked:
        check_server(uri)
        _checked.add(uri)
    return uri


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Reach the server's /health, then make one authenticated call with the client's credentials
    (MLFLOW_TRACKING_USERNAME/_PASSWORD or MLFLOW_TRACKING_TOKEN)."""
    base = uri.rstrip("/")
    try:
        urllib.request.urlopen(f"{base}/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, urllib.error.HTTPError) and e.code < 500:
            pass  # answered: reachable (a proxy may guard /health)
        else:
            raise ServiceUnavailable(f"the MLflow tracking server at {base} could not be reached "
                                     f"({getattr(e, 'reason', e)}); is it running? (MLFLOW_TRACKING_URI)") from None
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        req.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        json.loads(urllib.request.urlopen(req, timeout=timeout).read() or b"{}")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            who = f"user {user!r}" if user else "no credentials (MLFLOW_TRACKING_USERNAME is not set)"
            raise InputError(f"the MLflow tracking server at {base} refused {who}: HTTP {e.code}; "
                             "nothing was logged") from None
        if e.code >= 500:
            raise ServiceUnavailable(f"the MLflow tracking server at {base} answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ServiceUnavailable(f"the MLflow tracking server at {base} could not be reached ({e})") from None


def use_experiment(experiment: str) -> None:
    """Point the fluent MLflow API at the tracking URI and the project's experiment."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)


# ------------------------------------------------------------------------------------------ registry
def client():
    """An MlflowClient on `tracking_uri()` (the server checked first)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


def alias_version(c, name: str, alias: str):
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version(c, name: str, version: str | None, alias: str | None, who: str):
    """The registry version given by `--version N` or `--alias NAME`; InputError (exit 2) naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        mv = c.get_model_version(name, str(version)) if version else alias_version(c, name, alias)
    except MlflowException:
        mv = None
    if mv is None:
        what = f"version {version}" if version else f"alias {alias!r}"
        raise InputError(f"{who}: registered model {name!r} has no {what}")
    return mv


def download_adapter(c, version, dst: Path) -> Path:
    """Download a registry version and return its adapter folder: a pyfunc model's `artifacts/adapter`
    (`pipeline.serve`), or the version's folder itself (versions registered as a bare adapter)."""
    from mlflow.artifacts import download_artifacts

    local = Path(download_artifacts(artifact_uri=version.source, dst_path=str(dst), tracking_uri=c.tracking_uri))
    return local / "artifacts" / "adapter" if (local / "MLmodel").is_file() else local


def ensure_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="PEFT adapters of the drift-aware multimodal pipeline")



# --------------------------------------------------------------------------------------- train's run
class Tracker:
    """One MLflow run per `train`; a resumed run continues the run it started."""

    def __init__(self, params: config.Params, run_name: str = "train"):
        self.params, self.run_name, self.run_id = params, run_name, None

    def start(self, run_id: str | None, params: config.Params, preflight: dict) -> None:
        import mlflow

        use_experiment(params.mlflow.experiment)
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
