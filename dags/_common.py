"""Shared wiring for the DAG files: run `python -m pipeline ...` / `dvc ...` in the project folder.

Nothing heavy is imported here (no torch, transformers, peft, open_clip, evidently): the scheduler and
DAG processor parse these files often. Every task is a subprocess, so the work runs in its own process
(on a Celery worker of the right queue when scaled out) and the DAG files stay wiring only.

Environment:
  PIPELINE_PROJECT  the project folder (default: the folder above dags/)
  PIPELINE_PYTHON   the interpreter with the pipeline installed (default: the one running Airflow)
  MLFLOW_TRACKING_URI  made absolute (sqlite under the project) if unset, since tasks run elsewhere
  PIPELINE_TASK_RETRIES  retries per task (default 2; the training task gets one more)
  PIPELINE_RETRY_DELAY   seconds before the first retry (default 30; doubled each time)
  PIPELINE_MONITOR_SCHEDULE  the monitor DAG's schedule (default @daily; "none": triggered only)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

PROJECT = Path(os.environ.get("PIPELINE_PROJECT", Path(__file__).resolve().parents[1]))
PYTHON = os.environ.get("PIPELINE_PYTHON", sys.executable)
DVC_POOL = "dvc"  # one slot: DVC tasks never run at once (its repository lock is not a queue)
RETRIES = int(os.environ.get("PIPELINE_TASK_RETRIES", "2"))
RETRY_DELAY = timedelta(seconds=float(os.environ.get("PIPELINE_RETRY_DELAY", "30")))
DEFAULT_ARGS = {"retries": RETRIES, "retry_delay": RETRY_DELAY, "retry_exponential_backoff": True}
_schedule = os.environ.get("PIPELINE_MONITOR_SCHEDULE", "@daily")
MONITOR_SCHEDULE = None if _schedule.lower() == "none" else _schedule


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{PROJECT / 'mlflow.db'}")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    bin_dir = str(Path(PYTHON).parent)
    e["PATH"] = bin_dir + os.pathsep + e.get("PATH", "")
    return e


def run(args: list[str], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run a command in the project; exit 2 (unusable input) fails the task for good, anything else
    outside `ok` raises so that Airflow retries it."""
    from airflow.sdk.exceptions import AirflowFailException

    r = subprocess.run(args, cwd=PROJECT, env=env(), capture_output=True, text=True)
    print(r.stdout[-20000:])
    print(r.stderr[-20000:], file=sys.stderr)
    if r.returncode in ok:
        return r
    if r.returncode == 2:
        raise AirflowFailException(f"{' '.join(args)}: unusable input: {r.stderr.strip()[-2000:]}")
    raise RuntimeError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")


def pipeline(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "pipeline", *args], ok=ok)


def dvc(*args: str) -> subprocess.CompletedProcess:
    return run([str(Path(PYTHON).parent / "dvc"), "--wait-for-lock", *args])


def last_json(text: str) -> dict:
    """The JSON summary a pipeline command prints last on stdout: the last object that runs to the end of
    the output (log lines and earlier objects may come before it)."""
    decoder = json.JSONDecoder()
    start = text.rfind("{")
    while start >= 0:
        try:
            obj, end = decoder.raw_decode(text, start)
            if isinstance(obj, dict) and not text[end:].strip():
                return obj
        except json.JSONDecodeError:
            pass
        start = text.rfind("{", 0, start)
    return {}
