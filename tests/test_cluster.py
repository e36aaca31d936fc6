"""Scale-out on the real services (issue: scale-out): the local cluster of scripts/cluster.sh on this
machine's PostgreSQL and Redis — the MLflow server (PostgreSQL, basic auth) and Airflow with the
CeleryExecutor. One scenario, checked by the tests below:

1. hospital A: `dvc repro` + `promote` logging to the MLflow server over HTTP -> champion v1;
2. a drifted batch arrives; DAG `monitor` is triggered through Airflow's REST API; it triggers `finetune`,
   whose tasks run on the Celery workers (training on the `training` queue);
3. while `train` runs (two torchrun ranks), the training worker is SIGKILLed (its whole process group) and
   started again: the scheduler sees the dead task, the retry resumes training from the checkpoint; once
   it has, PostgreSQL itself is restarted under the running stack (Airflow's and MLflow's databases):
   connections are re-established, the run completes, and MLflow holds one complete train run;
4. `finetune` publishes (git commit + `dvc push`) and promotes; the new champion is read through the
   MLflow server's REST API; a fresh `git clone` + `dvc pull` gives the champion's adapter byte for byte.
Skipped, with the reason, where PostgreSQL or Redis is not reachable."""
import hashlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import BIN, ROOT, make_clone, run_ok, loop_project_params
from conftest import free_port


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


_missing = [n for n, port in (("PostgreSQL", 5432), ("Redis", 6379)) if not _reachable("127.0.0.1", port)]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_missing), reason=f"{' and '.join(_missing)} not reachable on 127.0.0.1: "
                                              "the scale-out tests run against the real services"),
]
CLUSTER = ROOT / "scripts" / "cluster.sh"
TIMEOUT = 1200


def _sourced(env_sh: Path, env: dict) -> dict:
    out = subprocess.run(["bash", "-c", f"source {env_sh} && env -0"], env=env, capture_output=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Airflow:
    """The Airflow 3 REST API with a JWT from /auth/token (simple auth manager)."""

    def __init__(self, url: str, user: str, password: str):
        self.url = url
        r = requests.post(f"{url}/auth/token", json={"username": user, "password": password}, timeout=30)
        r.raise_for_status()
        self.headers = {"Authorization": f"Bearer {r.json()['access_token']}"}

    def get(self, path: str) -> dict:
        r = requests.get(f"{self.url}/api/v2{path}", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        r = requests.post(f"{self.url}/api/v2/dags/{dag_id}/dagRuns", headers=self.headers,
                          json={"logical_date": None, "conf": conf or {}}, timeout=30)
        assert r.status_code in (200, 201), r.text
        return r.json()["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, deadline: float, during=None) -> dict:
        while time.time() < deadline:
            try:
                run = self.get(f"/dags/{dag_id}/dagRuns/{run_id}")
            except (requests.ConnectionError, requests.HTTPError) as e:  # the database is restarting
                if isinstance(e, requests.HTTPError) and e.response.status_code < 500:
                    raise
                time.sleep(2)
                continue
            if run["state"] in ("success", "failed"):
                return run
            if during:
                during()
            time.sleep(2)
        raise AssertionError(f"{dag_id} run {run_id} did not finish in time")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    repo, env = make_clone(tmp)
    p = loop_project_params(yaml.safe_load((repo / "params.yaml").read_text()))
    # long enough to be killed mid-run (QLoRA on the CPU), with frequent checkpoints
    p["train"].update(max_steps=150, checkpoint_every=5)
    # ... on two processes (DDP, gloo): the training worker's task starts torchrun, and the retry after the
    # kill resumes both ranks from the one checkpoint
    p["train"]["distributed"].update(nproc_per_node=2, rdzv_endpoint=f"127.0.0.1:{free_port()}")
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    remote = tmp / "dvc-remote"
    run_ok(["dvc", "remote", "modify", "--local", "shared", "url", str(remote)], repo, env)
    run_ok(["git", "commit", "-qam", "tiny params"], repo, env)
    prefix = f"pipeline_test_{os.getpid()}"
    cenv = {**env, "CLUSTER_DIR": str(tmp / "cluster"), "CLUSTER_DB_PREFIX": prefix,
            "MLFLOW_PORT": str(free_port()), "AIRFLOW_API_PORT": str(free_port()),
            "PIPELINE_PROJECT": str(repo), "PIPELINE_PYTHON": str(BIN / "python"),
            "PIPELINE_MONITOR_SCHEDULE": "none", "PIPELINE_RETRY_DELAY": "5", "PIPELINE_TASK_RETRIES": "1",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20"}
    cenv.pop("MLFLOW_TRACKING_URI", None)
    run_ok(["bash", str(CLUSTER), "start", "--fresh"], ROOT, cenv, timeout=600)
    facts: dict = {"repo": repo, "remote": remote, "tmp": tmp}
    try:
        e = _sourced(tmp / "cluster" / "env.sh", cenv)
        facts["env"] = e
        py = str(BIN / "python")
        # 1. hospital A, logged to the MLflow server over HTTP
        run_ok(["dvc", "repro"], repo, e)
        facts["first"] = json.loads(run_ok([py, "-m", "pipeline", "promote"], repo, e))
        run_ok([py, "-m", "pipeline", "synth", "--out", "data/incoming/b_phone", "--n", "40", "--seed", "9",
                "--site", "hospital_b", "--camera", "phone", "--image-size", "64"], repo, e)
        # 2. monitor through the REST API
        api = Airflow(f"http://127.0.0.1:{e['AIRFLOW_API_PORT']}", "admin", e["AIRFLOW_ADMIN_PASSWORD"])
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:  # the DAG processor has parsed both files
            try:
                api.get("/dags/monitor") and api.get("/dags/finetune")
                break
            except requests.HTTPError:
                time.sleep(2)
        run_id = api.trigger("monitor")
        facts["monitor"] = api.wait_run("monitor", run_id, deadline)
        runs = []
        while time.time() < deadline and not runs:
            runs = api.get("/dags/finetune/dagRuns")["dag_runs"]
            time.sleep(2)
        assert runs, "monitor did not trigger finetune"
        facts["finetune_conf"] = runs[0]["conf"]
        # 3. kill the training worker once train has written a checkpoint
        ckpt = repo / "models" / "checkpoints" / "last.pt"
        killed: dict = {}

        restarted: dict = {}

        def disturb_train():
            if restarted or not ckpt.is_file():
                return
            import torch

            try:
                blob = torch.load(ckpt, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 - caught between os.replace calls: look again next time
                return
            if not killed:
                killed.update(step=blob["step"], run_id=blob.get("run_id"), time=time.time())
                run_ok(["bash", str(CLUSTER), "kill-service", "worker-gpu"], ROOT, cenv)
                time.sleep(2)
                run_ok(["bash", str(CLUSTER), "start-service", "worker-gpu"], ROOT, cenv)
            elif blob["step"] > killed["step"]:  # the retry is training again: restart the database
                restarted.update(step=blob["step"], time=time.time())
                cluster = sorted(Path("/etc/postgresql").iterdir())[-1].name
                run_ok(["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"], ROOT, cenv)

        facts["finetune"] = api.wait_run("finetune", runs[0]["dag_run_id"], deadline, during=disturb_train)
        facts["killed"], facts["pg_restarted"] = killed, restarted
        facts["tasks"] = {t["task_id"]: t for t in api.get(
            f"/dags/finetune/dagRuns/{runs[0]['dag_run_id']}/taskInstances")["task_instances"]}
        facts["train_metrics"] = json.loads((repo / "models" / "train_metrics.json").read_text())
        yield facts
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], cwd=ROOT, env=cenv, capture_output=True, timeout=120)
        for db in ("airflow", "mlflow", "mlflow_auth"):
            subprocess.run(["psql", "postgresql://postgres@127.0.0.1:5432/postgres", "-qc",
                            f"DROP DATABASE IF EXISTS {prefix}_{db} WITH (FORCE)"], capture_output=True)


def _logs(facts) -> str:
    logs = Path(facts["env"]["AIRFLOW__LOGGING__BASE_LOG_FOLDER"])
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.rglob("*.log"))[-6:])


def test_monitor_triggered_over_rest_runs_finetune_on_celery_and_champion_is_read_from_the_server(scenario):
    e = scenario["env"]
    assert scenario["first"]["decision"] == "promoted"
    assert scenario["monitor"]["state"] == "success"
    assert scenario["finetune_conf"] == {"batch": str(scenario["repo"] / "data/incoming/b_phone")}
    assert scenario["finetune"]["state"] == "success", _logs(scenario)
    tasks = scenario["tasks"]
    assert {t: tasks[t]["state"] for t in ("ingest", "repro", "publish", "promote")} == dict.fromkeys(
        ("ingest", "repro", "publish", "promote"), "success")
    assert tasks["repro"]["queue"] == "training" and tasks["ingest"]["queue"] == "default"
    assert tasks["repro"]["hostname"] and tasks["ingest"]["hostname"]
    # the champion, through the server's REST API (basic auth), is the version finetune registered
    base = e["MLFLOW_TRACKING_URI"]
    auth = (e["MLFLOW_TRACKING_USERNAME"], e["MLFLOW_TRACKING_PASSWORD"])
    name = yaml.safe_load((scenario["repo"] / "params.yaml").read_text())["mlflow"]["registered_model"]
    r = requests.get(f"{base}/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": "champion"},
                     auth=auth, timeout=30)
    assert r.status_code == 200, r.text
    champion = r.json()["model_version"]
    assert int(champion["version"]) == int(scenario["first"]["version"]) + 1
    tags = {t["key"]: t["value"] for t in champion.get("tags", [])}
    assert tags["decision"].startswith("promoted") and tags["train_run_id"] == scenario["train_metrics"]["mlflow_run_id"]
    previous = requests.get(f"{base}/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": "previous"},
                            auth=auth, timeout=30).json()["model_version"]
    assert previous["version"] == str(scenario["first"]["version"])
    # wrong credentials are refused, and the pipeline says so (exit 2) instead of logging elsewhere
    bad = requests.get(f"{base}/api/2.0/mlflow/registered-models/alias", params={"name": name, "alias": "champion"},
                       auth=(auth[0], "wrong"), timeout=30)
    assert bad.status_code == 401
    r = subprocess.run([str(BIN / "python"), "-m", "pipeline", "promote"], cwd=scenario["repo"],
                       env={**e, "MLFLOW_TRACKING_PASSWORD": "wrong"}, capture_output=True, text=True)
    assert r.returncode == 2 and "refused user 'admin'" in r.stderr
    assert not (scenario["repo"] / "mlflow.db").exists() and not (scenario["repo"] / "mlruns").exists()


def test_a_postgresql_restart_mid_training_leaves_one_complete_run(scenario):
    from mlflow import MlflowClient

    restarted, metrics, e = scenario["pg_restarted"], scenario["train_metrics"], scenario["env"]
    assert restarted, "train finished before PostgreSQL could be restarted under it"
    assert scenario["finetune"]["state"] == "success" and metrics["steps"] == 150
    os.environ.update({k: e[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
    client = MlflowClient(e["MLFLOW_TRACKING_URI"])
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert sorted(set(steps)) == list(range(1, 151))  # every step logged, across the kill and the restart
    assert restarted["step"] < 150


def test_worker_killed_during_train_the_retry_resumes_from_the_checkpoint(scenario):
    killed, tasks, metrics = scenario["killed"], scenario["tasks"], scenario["train_metrics"]
    assert killed, "train finished before a checkpoint could be caught: no kill happened"
    assert killed["step"] > 0 and tasks["repro"]["try_number"] >= 2
    assert metrics["resumed_from_step"] is not None and metrics["resumed_from_step"] >= killed["step"]
    assert metrics["steps"] == 150 and metrics["processes"] == 2  # both ranks of the torchrun job resumed
    assert metrics["mlflow_run_id"] == killed["run_id"]  # the same MLflow run, continued


def test_dvc_push_then_pull_in_a_fresh_clone_gives_the_champions_adapter_byte_for_byte(scenario):
    from mlflow import MlflowClient

    from pipeline import tracking

    e, repo = scenario["env"], scenario["repo"]
    name = yaml.safe_load((repo / "params.yaml").read_text())["mlflow"]["registered_model"]
    os.environ.update({k: e[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")})
    client = MlflowClient(e["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(name, "champion")
    registered = tracking.download_adapter(client, champion, scenario["tmp"] / "registered")
    fresh = scenario["tmp"] / "fresh"
    env = {**e, "MLFLOW_TRACKING_URI": "sqlite:///unused.db"}
    run_ok(["git", "clone", "-q", str(repo), str(fresh)], scenario["tmp"], env)
    run_ok(["git", "checkout", "-q", champion.tags["git_commit"]], fresh, env)
    run_ok(["dvc", "remote", "modify", "--local", "shared", "url", str(scenario["remote"])], fresh, env)
    run_ok(["dvc", "pull"], fresh, env)
    pulled = _digest(fresh / "models" / "adapter")
    assert pulled and pulled == _digest(registered), "the pulled adapter differs from the champion's artifacts"
    assert pulled == _digest(repo / "models" / "adapter")
    status = run_ok(["dvc", "status"], fresh, env)
    assert "changed" not in status, status  # data, model and lock agree: nothing to re-run
