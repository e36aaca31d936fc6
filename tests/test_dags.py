"""DAG files: they load in a DagBag with no import errors, are wired as docs/design.md §8 says, and importing
them pulls in none of the heavy libraries (the scheduler parses them often)."""
import json
import os
import subprocess
import sys

from conftest import ROOT

HEAVY = ("torch", "transformers", "peft", "open_clip", "evidently", "mlflow", "sklearn")


def _python(code: str, tmp_path) -> dict:
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags")}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_dag_file_loads_in_a_dagbag_and_is_wired_as_designed(tmp_path):
    out = _python(f"""
import json
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(ROOT / "dags")!r})
m, f = bag.dags["monitor"], bag.dags["finetune"]
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "ids": sorted(bag.dag_ids),
  "m_schedule": str(m.schedule), "m_catchup": m.catchup, "m_runs": m.max_active_runs,
  "f_runs": f.max_active_runs, "f_schedule": str(f.schedule),
  "m_tasks": sorted(m.task_ids), "f_tasks": sorted(f.task_ids),
  "pools": {{t.task_id: t.pool for t in f.tasks}}, "queues": {{t.task_id: t.queue for t in f.tasks}},
  "trigger": m.get_task("trigger_finetune").partial_kwargs.get("trigger_dag_id"),
  "kinds": {{t.task_id: [k.__name__ for k in type(t).__mro__] for t in f.tasks}},
  "f_up": {{t.task_id: sorted(t.upstream_task_ids) for t in f.tasks}}}}))
""", tmp_path)
    assert out["errors"] == {} and out["ids"] == ["finetune", "monitor"]
    assert out["m_schedule"] == "@daily" and out["m_catchup"] is False and out["m_runs"] == 1
    assert out["f_runs"] == 1 and out["f_schedule"] in ("None", "")
    assert {"find_batches", "check", "decide", "drifted", "no_drift", "trigger_finetune", "alerts"} <= set(out["m_tasks"])
    assert out["f_tasks"] == ["apply_approval", "approval", "ingest", "needs_approval", "promote", "publish",
                              "record_rejection", "repro"]
    assert out["pools"]["ingest"] == out["pools"]["repro"] == out["pools"]["publish"] == "dvc"  # never at once
    assert out["queues"]["repro"] == "training" and out["trigger"] == "finetune"
    # chained with >>, one after the other: ingest -> repro -> publish -> promote, then the approval path;
    # record_rejection is not a direct downstream of approval (which skips those when a person rejects)
    assert out["f_up"] == {"ingest": [], "repro": ["ingest"], "publish": ["repro"], "promote": ["publish"],
                           "needs_approval": ["promote"], "approval": ["needs_approval"],
                           "apply_approval": ["approval", "promote"], "record_rejection": ["apply_approval", "promote"]}
    assert "ApprovalOperator" in out["kinds"]["approval"]  # Airflow's human-in-the-loop approval


def test_last_json_reads_the_summary_printed_last():
    sys.path.insert(0, str(ROOT / "dags"))
    from _common import last_json

    text = 'log line {not json}\n{"early": 1}\nmore {"x": 2} log\n{\n  "batch": "b", "reasons": [{"k": 1}]\n}\n'
    assert last_json(text) == {"batch": "b", "reasons": [{"k": 1}]}
    assert last_json("no summary at all") == {}


def test_importing_the_dag_files_imports_no_heavy_library(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow")}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'dags')!r}); import monitor, finetune; "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
