"""DVC: `dvc repro` on a clean clone runs synth -> ... -> evaluate, and a second repro does nothing."""
import json

import pytest
import yaml

from conftest import BIN, make_clone, run_ok as _run, tiny_project_params


@pytest.fixture
def clone(tmp_path):
    return make_clone(tmp_path)


@pytest.mark.slow
def test_dvc_repro_from_a_clean_clone(clone):
    repo, env = clone
    params = yaml.safe_load((repo / "params.yaml").read_text())
    tiny_project_params(params)  # small, so the test stays fast
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
    seed = params["split"]["seed"]
    params["split"]["seed"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([str(BIN / "dvc"), "status"], repo, env)
    assert "split" in out and "curate" not in out and "base" not in out
    params["split"]["seed"] = seed
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # editing a library module re-runs every stage that imports it, directly or not, and no other:
    # scoring.py (train's checkpoint choice and evaluate), then model.py (base, train, evaluate)
    changed = lambda: {line.rstrip(":").strip() for line in _run([str(BIN / "dvc"), "status"], repo, env).splitlines()
                       if line.strip().endswith(":") and not line.startswith(("\t", " "))}  # noqa: E731
    assert changed() == set()
    with open(repo / "pipeline" / "scoring.py", "a") as fh:
        fh.write("\n# edited\n")
    assert changed() == {"train", "evaluate"}
    with open(repo / "pipeline" / "model.py", "a") as fh:
        fh.write("\n# edited\n")
    assert changed() == {"base", "train", "evaluate"}
