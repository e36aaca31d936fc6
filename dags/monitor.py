"""DAG `monitor`: nightly drift check of every new batch in `paths.incoming`, then `finetune` for each
batch whose drift crosses the thresholds (docs/design.md §8). Wiring only: each task runs `python -m pipeline`.

find_batches -> check (one mapped task per batch) -> decide (branch) -> drifted -> trigger_finetune
                                                                     \\-> no_drift
                                                   \\-> alerts (logs and records the batches with an alert)
A batch counts as checked once `reports/drift/<batch>/drift.json` exists: `monitor` writes it (atomically)
only after a successful check, so a failed or interrupted check is tried again the next night.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common.py sits beside this file
from _common import DEFAULT_ARGS, MONITOR_SCHEDULE, last_json, pipeline  # noqa: E402


@dag(dag_id="monitor", schedule=MONITOR_SCHEDULE, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     max_active_runs=1, default_args=DEFAULT_ARGS, tags=["drift"], doc_md=__doc__)
def monitor():
    @task
    def find_batches() -> list[str]:
        return last_json(pipeline("monitor", "--pending").stdout).get("pending", [])

    @task(max_active_tis_per_dag=1)
    def check(batch: str) -> dict:
        r = pipeline("monitor", "--batch", batch, ok=(0, 1))
        summary = last_json(r.stdout)
        return {"batch": batch, "retrain": r.returncode == 1, "status": summary.get("status"),
                "reasons": summary.get("reasons", []), "drifted_kinds": summary.get("drifted_kinds", []),
                "report": summary.get("report")}

    @task.branch(trigger_rule="all_done")
    def decide(results: list) -> str:
        drifted = [r for r in results if r and r.get("retrain")]
        return "drifted" if drifted else "no_drift"

    @task
    def drifted(results: list) -> list[dict]:
        return [{"batch": r["batch"]} for r in results if r and r.get("retrain")]

    @task
    def no_drift() -> str:
        return "no batch calls for retraining"

    @task(trigger_rule="all_done")
    def alerts(results: list) -> list[dict]:
        """Drift that calls for no re-fine-tune (e.g. only the label mix changed, or the F1 held): logged,
        and kept as this task's XCom beside each batch's drift.json."""
        found = [{"batch": r["batch"], "kinds": r.get("drifted_kinds", []), "reasons": r["reasons"],
                  "report": r.get("report")} for r in results if r and r.get("status") == "alert"]
        for a in found:
            print(f"ALERT {a['batch']}: {', '.join(a['kinds'])} -- " + " | ".join(a["reasons"]))
        return found

    results = check.expand(batch=find_batches())
    alerts(results)
    confs = drifted(results)
    decide(results) >> [confs, no_drift()]
    TriggerDagRunOperator.partial(task_id="trigger_finetune", trigger_dag_id="finetune",
                                  wait_for_completion=False).expand(conf=confs)


monitor()
