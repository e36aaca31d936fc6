"""The command line of docs/design.md §10: commands, --params/--set, exit codes, nothing written on failure."""
import json
import subprocess
import sys


from conftest import ROOT


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True)


def test_synth_curate_split_chain(tmp_path):
    raw, cur, spl = tmp_path / "raw", tmp_path / "cur", tmp_path / "spl"
    r = cli("synth", "--out", str(raw), "--n", "40", "--image-size", "64", "--seed", "2", "--camera", "lamp")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] >= 40
    sets = ["--set", f"paths.raw={raw}", "--set", f"paths.curated={cur}", "--set", f"paths.split={spl}",
            "--set", "curate.mismatch.enabled=false"]
    r = cli("curate", *sets)
    assert r.returncode == 0, r.stderr
    report = json.loads((cur / "report.json").read_text())
    assert report["rows_in"] == report["accepted"] + report["quarantined"]
    r = cli("split", *sets, "--set", "split.min_stratum=2")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in spl.iterdir()} == {"train.jsonl", "val.jsonl", "test.jsonl", "val_mismatch.jsonl", "report.json"}


def test_bad_manifest_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "manifest.csv").write_text("id,image\na,a.png\n")
    r = cli("curate", "--set", f"paths.raw={tmp_path / 'raw'}", "--set", f"paths.curated={tmp_path / 'cur'}")
    assert r.returncode == 2
    assert "missing required column" in r.stderr and "caption" in r.stderr
    assert not (tmp_path / "cur").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_misspelt_param_exits_2_naming_it(tmp_path):
    r = cli("split", "--set", "split.sed=1")
    assert r.returncode == 2 and "split.sed" in r.stderr
    (tmp_path / "p.yaml").write_text("curate:\n  min_word: 3\n")
    r = cli("curate", "--params", str(tmp_path / "p.yaml"))
    assert r.returncode == 2 and "curate.min_word" in r.stderr


def test_missing_params_file_exits_2(tmp_path):
    r = cli("split", "--params", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "not found" in r.stderr


def test_split_without_curated_data_exits_2(tmp_path):
    r = cli("split", "--set", f"paths.curated={tmp_path / 'nothing'}", "--set", f"paths.split={tmp_path / 's'}")
    assert r.returncode == 2 and "run curate first" in r.stderr
    assert not (tmp_path / "s").exists()


def test_later_stage_commands_exit_2_on_unusable_input(tmp_path):
    env_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = cli("evaluate", "--set", f"paths.models={tmp_path / 'm'}", "--set", f"paths.reports={tmp_path / 'r'}")
    assert r.returncode == 2 and "no adapter" in r.stderr and not (tmp_path / "r").exists()
    r = cli("monitor", "--batch", str(tmp_path / "gone"), "--set", f"paths.reports={tmp_path / 'r'}")
    assert r.returncode == 2 and "not found" in r.stderr and not (tmp_path / "r").exists()
    r = cli("ingest", "--batch", str(tmp_path / "gone"), "--params", str(ROOT / "params.yaml"))
    assert r.returncode == 2 and "not found" in r.stderr
    r = subprocess.run([sys.executable, "-m", "pipeline", "promote", "--rollback"], cwd=ROOT, capture_output=True,
                       text=True, env={**__import__("os").environ, "MLFLOW_TRACKING_URI": env_uri})
    assert r.returncode == 2 and "no registered model" in r.stderr


def test_unreachable_tracking_server_exits_3_naming_it_and_logs_nowhere_else(tmp_path):
    import os
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    for command in (["promote", "--rollback"], ["lineage"], ["export", "--alias", "champion"]):
        r = subprocess.run([sys.executable, "-m", "pipeline", *command, "--params", str(ROOT / "params.yaml")],
                           cwd=tmp_path, capture_output=True, text=True, env=env)
        assert r.returncode == 3, (command, r.stderr)
        assert f"MLflow tracking server at http://127.0.0.1:{port} could not be reached" in r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_publish_outside_a_project_exits_2(tmp_path):
    r = cli("publish", "--params", str(ROOT / "params.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "dvc.yaml not found" in r.stderr


def test_monitor_pending_lists_the_batches_not_yet_checked(tmp_path):
    incoming, reports = tmp_path / "incoming", tmp_path / "reports"
    for name in ("b1", "b2", "b3"):
        (incoming / name).mkdir(parents=True)
    (reports / "drift" / "b2").mkdir(parents=True)
    (reports / "drift" / "b2" / "drift.json").write_text("{}")  # b2 was checked
    (reports / "drift" / "b3").mkdir()  # b3's check did not finish: still pending
    r = cli("monitor", "--pending", "--set", f"paths.incoming={incoming}", "--set", f"paths.reports={reports}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"pending": [str(incoming / "b1"), str(incoming / "b3")]}
    r = cli("monitor", "--set", f"paths.incoming={incoming}")
    assert r.returncode == 2 and "--batch" in r.stderr
