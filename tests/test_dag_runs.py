"""The nightly loop end to end, offline, with the tiny model: `airflow dags test monitor` on a drifted
batch triggers `finetune`; `airflow dags test finetune` ingests it, re-runs the pipeline with QLoRA and
ends with a promotion decision that follows the gates (real MLflow SQLite registry, real DVC)."""
import json
import sqlite3

import pytest
import yaml
from mlflow import MlflowClient

from conftest import BIN, make_clone, run_ok, loop_project_params


@pytest.mark.slow
def test_monitor_triggers_finetune_which_decides_by_the_gates(tmp_path, params):
    repo, env = make_clone(tmp_path)
    p = loop_project_params(yaml.safe_load((repo / "params.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    run_ok(["dvc", "remote", "modify", "--local", "shared", "url", str(tmp_path / "remote")], repo, env)
    run_ok(["git", "commit", "-qam", "tiny params"], repo, env)
    env = {**env, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(repo / "dags"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PIPELINE_PROJECT": str(repo), "PIPELINE_TASK_RETRIES": "0",
           "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    py, airflow = str(BIN / "python"), str(BIN / "airflow")
    # hospital A: the pipeline and a first champion
    run_ok([str(BIN / "dvc"), "repro"], repo, env)
    first = json.loads(run_ok([py, "-m", "pipeline", "promote"], repo, env))
    assert first["decision"] == "promoted"
    # hospital B's phone pictures arrive
    run_ok([py, "-m", "pipeline", "synth", "--out", "data/incoming/b_phone", "--n", "40", "--seed", "9",
            "--site", "hospital_b", "--camera", "phone", "--image-size", "64"], repo, env)
    run_ok([airflow, "db", "migrate"], repo, env)
    run_ok([airflow, "pools", "set", "dvc", "1", "DVC tasks, one at a time"], repo, env)
    run_ok([airflow, "dags", "test", "monitor"], repo, env)
    drift = json.loads((repo / "reports/drift/b_phone/drift.json").read_text())
    assert drift["retrain"] is True
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as db:  # the run monitor's trigger created
        runs = db.execute("SELECT conf, state FROM dag_run WHERE dag_id = 'finetune'").fetchall()
    assert len(runs) == 1 and json.loads(runs[0][0]) == {"batch": str(repo / "data/incoming/b_phone")}
    # the triggered run, with its conf
    out = run_ok([airflow, "dags", "test", "finetune", "-c", json.dumps({"batch": str(repo / "data/incoming/b_phone")})],
                 repo, env, timeout=1500)
    q = yaml.safe_load((repo / "params.yaml").read_text())
    assert q["train"]["peft"]["method"] == "qlora" and q["promote"]["improve_on"] == ["b_phone"]
    assert json.loads((repo / "models/adapter/pipeline_meta.json").read_text())["method"] == "qlora"
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert {"test", "b_phone", "b_phone_old_test"} <= set(metrics["sets"])
    c = MlflowClient(env["MLFLOW_TRACKING_URI"])
    name = p["mlflow"]["registered_model"]
    newest = max(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    champion = c.get_model_version_by_alias(name, "champion")
    decision = newest.tags["decision"]
    if metrics["passed"]:  # every gate passed and any challenger counts as better: it must take over
        assert decision.startswith("promoted") and champion.version == newest.version
        assert str(c.get_model_version_by_alias(name, "previous").version) == first["version"]
    else:
        assert decision.startswith("rejected") and str(champion.version) == first["version"]
    assert "Marking run" in out or "success" in out.lower()
    # publish: the DVC metadata of this version is committed and its data and model are on the remote
    head = run_ok(["git", "show", "--stat", "--format=%s", "HEAD"], repo, env)
    assert "dvc.lock" in head and "data/batches/b_phone.dvc" in head and "data/eval/b_phone.dvc" in head
    assert newest.tags["git_commit"] == run_ok(["git", "rev-parse", "HEAD"], repo, env).strip()
    status = run_ok(["dvc", "status", "--cloud"], repo, env)
    assert "new:" not in status and "missing:" not in status, status  # nothing left to push
