"""The nightly loop end to end, offline, with the tiny model: `airflow dags test monitor` on a drifted
batch triggers `finetune`; `airflow dags test finetune` ingests it, re-runs the pipeline with QLoRA and
ends with a promotion decision that follows the gates and, with `promote.approval: required`, waits for a
person, who answers through Airflow's REST API: approve (the alias moves), reject (nothing moves)
(real MLflow SQLite registry, real DVC, a real Airflow API server)."""
import json
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml
from mlflow import MlflowClient

from conftest import BIN, free_port, loop_project_params, make_clone, run_ok, stop


def _api(url: str, method: str = "GET", body: dict | None = None) -> dict:
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def finetune_answered(repo, env, batch: str, api: str, choice: str, timeout: float = 1500) -> tuple[dict, str]:
    """`airflow dags test finetune` on `batch`; when its approval task waits, a person answers `choice`
    through the REST API. Returns (the request the person saw, the DAG run's output)."""
    proc = subprocess.Popen([str(BIN / "airflow"), "dags", "test", "finetune", "-c", json.dumps({"batch": batch})],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, seen = time.time() + timeout, None
    try:
        while seen is None:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("finetune ended (or timed out) without asking for approval:\n" + proc.stdout.read()[-5000:])
            try:
                pending = [h for h in _api(f"{api}/dags/finetune/dagRuns/~/hitlDetails")["hitl_details"]
                           if not h["response_received"]]
            except (urllib.error.URLError, OSError):
                pending = []
            if pending:
                seen = pending[0]
            else:
                time.sleep(2)
        ti = seen["task_instance"]
        run_id = urllib.parse.quote(ti["dag_run_id"], safe="")
        answered = _api(f"{api}/dags/finetune/dagRuns/{run_id}/taskInstances/{ti['task_id']}/-1/hitlDetails",
                        "PATCH", {"chosen_options": [choice]})
        out, _ = proc.communicate(timeout=max(60, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    return {**seen, "answer": answered}, out


@pytest.mark.slow
def test_monitor_triggers_finetune_which_decides_by_the_gates_and_a_person(tmp_path, params):
    repo, env = make_clone(tmp_path)
    p = loop_project_params(yaml.safe_load((repo / "params.yaml").read_text()))
    p["promote"]["approval"] = "required"
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
    assert first["decision"] == "awaiting approval" and first["champion"] is None  # promote.approval: required
    r = subprocess.run([py, "-m", "pipeline", "promote", "--approve", "99"], cwd=repo, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "has no version 99" in r.stderr
    first = json.loads(run_ok([py, "-m", "pipeline", "promote", "--approve", first["version"], "--by", "dr-a"], repo, env))
    assert first["decision"] == "promoted" and first["approved_by"] == "dr-a"
    r = subprocess.run([py, "-m", "pipeline", "promote", "--reject", first["version"]], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "is not awaiting approval" in r.stderr
    # lineage: the champion's recorded hashes are dvc.lock's, its base and runs are this pipeline's
    lin = json.loads(run_ok([py, "-m", "pipeline", "lineage"], repo, env))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", []) if "md5" in o}
    assert lin["version"] == first["version"] and lin["aliases"] == ["challenger", "champion"]
    assert lin["dvc"] == outs and {"data/curated", "data/split", "models/base", "models/adapter"} <= set(outs)
    assert lin["base_weights_sha256"] == (repo / "models/base/weights_sha256.txt").read_text().strip()
    assert lin["train"]["run_id"] == json.loads((repo / "models/train_metrics.json").read_text())["mlflow_run_id"]
    assert lin["evaluate"]["metrics"]["f1_macro"] == pytest.approx(json.loads((repo / "reports/metrics.json").read_text())["f1_macro"])
    assert f"data/curated: md5 {outs['data/curated']}" in lin["chain"]
    r = subprocess.run([py, "-m", "pipeline", "lineage", "--version", "99"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "has no version 99" in r.stderr
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
    # the triggered run, with its conf; it waits for a person, who approves through the REST API
    port = free_port()
    api_env = {**env, "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}  # no login in this test
    server = subprocess.Popen([airflow, "api-server", "--port", str(port)], cwd=repo, env=api_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v2"
    try:
        asked, out = finetune_answered(repo, api_env, str(repo / "data/incoming/b_phone"), api, "Approve")
        q = yaml.safe_load((repo / "params.yaml").read_text())
        assert q["train"]["peft"]["method"] == "qlora" and q["promote"]["improve_on"] == ["b_phone"]
        assert json.loads((repo / "models/adapter/pipeline_meta.json").read_text())["method"] == "qlora"
        metrics = json.loads((repo / "reports/metrics.json").read_text())
        assert {"test", "b_phone", "b_phone_old_test"} <= set(metrics["sets"])
        assert metrics["passed"], metrics["gates"]  # the loop's gates pass any model: the approval path runs
        c = MlflowClient(env["MLFLOW_TRACKING_URI"])
        name = p["mlflow"]["registered_model"]
        newest = max(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        # what the person saw: the decision, its reasons, the model, the runs and the Evidently report
        assert asked["subject"] == f"Promote {newest.version} to champion?"
        assert "awaiting approval" in asked["body"] and "b_phone: f1_macro" in asked["body"]
        # after a real ingest (the data split again), the models were compared on samples neither saw
        assert "samples neither saw" in asked["body"]
        assert f"models:/{name}/{newest.version}" in asked["body"] and "train run:" in asked["body"]
        assert "reports/drift/b_phone/drift.html" in asked["body"]
        # approved: the alias moved, the decision and the person are recorded
        newest = c.get_model_version(name, newest.version)
        assert newest.tags["decision"].startswith("promoted (approved by")
        assert newest.tags["approved_by"] == asked["answer"]["responded_by"]["name"]
        assert str(c.get_model_version_by_alias(name, "champion").version) == str(newest.version)
        assert str(c.get_model_version_by_alias(name, "previous").version) == first["version"]
        assert "Marking run" in out or "success" in out.lower()
        # publish: the DVC metadata of this version is committed and its data and model are on the remote
        head = run_ok(["git", "show", "--stat", "--format=%s", "HEAD"], repo, env)
        assert "dvc.lock" in head and "data/batches/b_phone.dvc" in head and "data/eval/b_phone.dvc" in head
        assert newest.tags["git_commit"] == run_ok(["git", "rev-parse", "HEAD"], repo, env).strip()
        status = run_ok(["dvc", "status", "--cloud"], repo, env)
        assert "new:" not in status and "missing:" not in status, status  # nothing left to push

        # a third batch; this time the person rejects: tagged so, and no alias moves
        run_ok([py, "-m", "pipeline", "synth", "--out", "data/incoming/c_phone", "--n", "40", "--seed", "11",
                "--site", "hospital_c", "--camera", "phone", "--image-size", "64"], repo, env)
        before = {a: str(c.get_model_version_by_alias(name, a).version) for a in ("champion", "previous")}
        asked, _ = finetune_answered(repo, api_env, str(repo / "data/incoming/c_phone"), api, "Reject")
        third = max(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        assert int(third.version) == int(newest.version) + 1 and asked["subject"] == f"Promote {third.version} to champion?"
        assert third.tags["decision"].startswith("rejected by a person")
        assert third.tags["rejected_by"] == asked["answer"]["responded_by"]["name"]
        assert {a: str(c.get_model_version_by_alias(name, a).version) for a in ("champion", "previous")} == before
    finally:
        stop(server)
