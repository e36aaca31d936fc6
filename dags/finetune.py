"""DAG `finetune`: a drifted, labelled batch -> training data -> QLoRA re-fine-tune -> gates -> promote.

conf: {"batch": "data/incoming/<batch>"}. Wiring only: each task runs `python -m pipeline` or `dvc`.

ingest -> repro -> publish -> promote
- ingest: the batch's training part becomes a new raw batch, its held-out part and the old test set
  become evaluation sets, params.yaml switches `train.peft.method` to QLoRA (pipeline/ingest.py);
- repro: `dvc --wait-for-lock repro` (curate -> split -> train -> evaluate re-run as the changes require);
- publish: commits dvc.lock, params.yaml and the batch's .dvc files (git) and `dvc push`es the data and
  the model to the DVC remote (`publish.remote`), so that a fresh clone can `dvc pull` this version;
- promote: registers the adapter; `champion` moves only if every gate passes, the new batch's F1
  improves and the old test set's F1 falls by no more than `promote.max_drop` (catastrophic forgetting).
  Exit 1 (gates failed) ends the run with the decision recorded, not as an error.
DVC tasks share the one-slot pool `dvc`; `max_active_runs=1` queues a second trigger until this run ends.
Training goes to the `training` queue (a GPU worker when scaled out); the rest to the default queue.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits beside this file
from _common import DEFAULT_ARGS, DVC_POOL, RETRIES, dvc, last_json, pipeline  # noqa: E402

TRAIN_QUEUE = os.environ.get("PIPELINE_TRAIN_QUEUE", "training")


@dag(dag_id="finetune", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=["drift", "training"], doc_md=__doc__,
     params={"batch": Param("", type="string", description="batch folder, e.g. data/incoming/<batch>")})
def finetune():
    @task(pool=DVC_POOL)
    def ingest(params=None) -> dict:
        batch = (params or {}).get("batch")
        if not batch:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException("finetune: conf needs {'batch': 'data/incoming/<batch>'}")
        return last_json(pipeline("ingest", "--batch", batch).stdout)

    @task(pool=DVC_POOL, queue=TRAIN_QUEUE, retries=RETRIES + 1)
    def repro() -> str:
        # a killed worker's retry resumes training from models/checkpoints/last.pt
        return dvc("repro").stdout[-2000:]

    @task(pool=DVC_POOL)
    def publish() -> dict:
        return last_json(pipeline("publish", "--message", "finetune: re-fine-tuned on a drifted batch").stdout)

    @task
    def promote() -> dict:
        r = pipeline("promote", ok=(0, 1))
        if r.returncode == 1:
            return {"decision": "not promoted: gates failed", "detail": r.stderr.strip()[-2000:]}
        return last_json(r.stdout)

    ingest() >> repro() >> publish() >> promote()


finetune()
