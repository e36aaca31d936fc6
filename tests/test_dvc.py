"""DVC: `dvc repro` on a clean clone runs synth -> ... -> evaluate, and a second repro does nothing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

BIN = Path(sys.executable).parent


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture
def clone(tmp_path):
    """A clean git clone of the working tree (tracked files as they are now)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    dst = tmp_path / "repo"
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], dst, env)
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "commit", "-qm", "init"], dst, env)
    return dst, env


@pytest.mark.slow
def test_dvc_repro_from_a_clean_clone(clone):
    repo, env = clone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["synth"].update(n=60, image_size=64)  # small, so the test stays fast
    params["curate"]["mismatch"].update(epochs=2, folds=3, image_size=32)
    params["split"]["min_stratum"] = 4
    params["base"].update(steps=10, images=32, corpus_captions=200)
    params["train"].update(max_steps=3, batch_size=4, checkpoint_every=2)
    params["evaluate"].update(max_new_tokens=4, permutations=1)
    params["evaluate"]["bias"].update(bootstrap=20)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run([str(BIN / "dvc"), "repro"], repo, env)
    report = json.loads((repo / "data/curated/report.json").read_text())
    assert report["rows_in"] == report["accepted"] + report["quarantined"] > 60
    split_report = json.loads((repo / "data/split/report.json").read_text())
    assert split_report["patient_overlap"] == 0
    assert (repo / "models/adapter/adapter_model.safetensors").is_file()
    assert json.loads((repo / "models/train_metrics.json").read_text())["steps"] == 3
    assert (repo / "dvc.lock").is_file()
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert {"f1_macro", "image_reliance", "gates", "bias"} <= set(metrics)
    assert (repo / "reports/eval/predictions.jsonl").is_file() and (repo / "reports/eval/confusion.png").is_file()
    out = _run([str(BIN / "dvc"), "status"], repo, env)
    assert "up to date" in out.lower()
    # changing a split param re-runs split only
    params["split"]["seed"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([str(BIN / "dvc"), "status"], repo, env)
    assert "split" in out and "curate" not in out and "base" not in out
