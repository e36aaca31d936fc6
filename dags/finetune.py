"""DAG `finetune`: a drifted, labelled batch -> training data -> QLoRA re-fine-tune -> gates -> promote.

conf: {"batch": "data/incoming/<batch>"}. Wiring only: each task runs `python -m pipeline` or `dvc`.

ingest -> repro -> publish -> promote -> needs_approval -> approval -> apply_approval -> record_rejection
- ingest: the batch's training part becomes a new raw batch, its held-out part and the old test set
  become evaluation sets, params.yaml switches `train.peft.method` to QLoRA (pipeline/ingest.py);
- repro: `dvc --wait-for-lock repro` (curate -> split -> train -> evaluate re-run as the changes require);
- publish: commits dvc.lock, params.yaml and the batch's .dvc files (git) and `dvc push`es the data and
  the model to the DVC remote (`publish.remote`), so that a fresh clone can `dvc pull` this version;
- promote: registers the adapter; `champion` moves only if every gate passes, the new batch's F1
  improves and the old test set's F1 falls by no more than `promote.max_drop` (catastrophic forgetting).
  Exit 1 (gates failed) ends the run with the decision recorded, not as an error.
- approval (only with `promote.approval: required` and a challenger that earned `champion`): Airflow's
  human-in-the-loop ApprovalOperator shows the decision, the reasons and links to the MLflow runs, the
  model version and the Evidently report, and the run waits. Approve -> `apply_approval` runs
  `promote --approve N --by <who>` (the alias moves); Reject -> `record_rejection` runs
  `promote --reject N --by <who>` (the version is tagged rejected by a person, nothing moves).
DVC tasks share the one-slot pool `dvc`; `max_active_runs=1` queues a second trigger until this run ends.
Training goes to the `training` queue (a GPU worker when scaled out); the rest to the default queue.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param, dag, task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits beside this file
from _common import DEFAULT_ARGS, DVC_POOL, PROJECT, RETRIES, dvc, last_json, pipeline  # noqa: E402

TRAIN_QUEUE = os.environ.get("PIPELINE_TRAIN_QUEUE", "training")
AWAITING = "awaiting approval"  # promote's decision when `promote.approval: required` holds the alias back


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
    def promote(params=None) -> dict:
        r = pipeline("promote", ok=(0, 1))
        if r.returncode == 1:
            return {"decision": "not promoted: gates failed", "detail": r.stderr.strip()[-2000:]}
        out = last_json(r.stdout)
        return {**out, "body": approval_body(out, (params or {}).get("batch", ""))}

    @task.branch
    def needs_approval(decision: dict) -> list[str]:
        return ["approval"] if decision.get("decision") == AWAITING else []

    approval = PromotionApproval(
        task_id="approval", subject="Promote {{ ti.xcom_pull(task_ids='promote')['version'] }} to champion?",
        body="{{ ti.xcom_pull(task_ids='promote')['body'] }}")

    @task
    def apply_approval(decision: dict, ti=None) -> dict:
        answer = ti.xcom_pull(task_ids="approval", key="answer")
        return last_json(pipeline("promote", "--approve", decision["version"], "--by", responder(answer)).stdout)

    @task(trigger_rule="none_failed")  # not a direct downstream of `approval`, which skips those on Reject
    def record_rejection(decision: dict, ti=None) -> dict:
        answer = ti.xcom_pull(task_ids="approval", key="answer")
        if not answer or answer.get("chosen_options") != [ApprovalOperator.REJECT]:
            return {"decision": "nothing to record"}
        return last_json(pipeline("promote", "--reject", decision["version"], "--by", responder(answer)).stdout)

    decided = promote()
    applied = apply_approval(decided)
    ingest() >> repro() >> publish() >> decided >> needs_approval(decided) >> approval >> applied
    applied >> record_rejection(decided)


class PromotionApproval(ApprovalOperator):
    """Airflow's ApprovalOperator that first records the answer (the option and who chose it) as XCom
    `answer`: on Reject the operator skips its direct downstream tasks and returns no value."""

    def execute_complete(self, context, event):
        if "error" not in event:
            context["ti"].xcom_push(key="answer", value={"chosen_options": list(event["chosen_options"]),
                                                         "responded_by_user": event.get("responded_by_user")})
        return super().execute_complete(context, event)


def responder(answer: dict) -> str:
    user = (answer or {}).get("responded_by_user") or {}
    return str(user.get("name") or user.get("id") or "a person")


def approval_body(out: dict, batch: str) -> str:
    """What the person approving sees: the decision, its reasons, and where to look."""
    lines = [f"**{out.get('decision')}**: version {out.get('version')} (champion now: {out.get('champion')})", ""]
    lines += [f"- {r}" for r in out.get("reasons", [])]
    links = out.get("links", {})
    lines += ["", f"- model: `{links.get('model')}` (MLflow {links.get('tracking_uri')})"]
    for key in ("train_run", "eval_run"):
        if links.get(f"{key}_id"):
            lines.append(f"- {key.replace('_', ' ')}: {links.get(f'{key}_url') or links[f'{key}_id']}")
    if batch:
        lines.append(f"- Evidently drift report: {PROJECT / 'reports' / 'drift' / Path(batch).name / 'drift.html'}")
    return "\n".join(lines)

finetune()
