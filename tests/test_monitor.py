"""monitor: a batch from another camera is flagged and one from the reference is not; the report has
the docs/design.md §3.6 fields; empty, caption-less, mostly unreadable and vanished batches are handled."""
import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline import config, data as dataio, monitor
from pipeline.errors import DriftFound, InputError

from conftest import ALL_FAULTS, make_dataset, small_eval, tiny, trained_project


@pytest.fixture(scope="module")
def project(tmp_path_factory, params, base_dir, records):
    """A project whose split (the reference) is the 40-lesion clean set, sharing the session's base."""
    root = tmp_path_factory.mktemp("monitor")
    p = small_eval(tiny(params, root))
    sp = Path(p.paths.split)
    sp.mkdir(parents=True)
    dataio.write_jsonl(sp / "train.jsonl", records[:32])
    dataio.write_jsonl(sp / "val.jsonl", records[32:])
    (root / "models").mkdir()
    os.symlink(base_dir, root / "models" / "base")
    # MMD, as the loop tests: Evidently's domain classifier is too noisy at 40 rows a side (the drift issue)
    m = dataclasses.replace(p.monitor, min_rows=10, min_captions=5, adapter="local",
                            embedding=config.DriftTest("mmd", 0.015))
    return dataclasses.replace(p, monitor=m), root


def _phone_batch(root: Path, params, n=40) -> Path:
    clean = {k: 0.0 for k in ALL_FAULTS}
    return make_dataset(root, params, n=n, image_size=64, seed=11, site="hospital_b", camera="phone", faults=clean)


def test_a_batch_from_another_camera_is_flagged_with_the_report_fields(project, params, tmp_path):
    p, _ = project
    batch = _phone_batch(tmp_path / "b_phone", params)
    with pytest.raises(DriftFound) as found:
        monitor.main(p, str(batch))
    assert json.loads(str(found.value))["retrain"] is True
    out = Path(p.paths.reports) / "drift" / "b_phone"
    d = json.loads((out / "drift.json").read_text())
    assert set(d["embedding_drift"]) >= {"method", "score", "threshold", "drifted"}
    assert set(d["loss_drift"]) >= {"method", "score", "threshold", "drifted"}
    assert d["embedding_drift"]["drifted"] and d["embedding_drift"]["score"] >= d["embedding_drift"]["threshold"]
    assert d["retrain"] is True and d["reasons"][0].startswith("embedding drift")
    assert d["loss_drift"]["note"] == "no adapter (run train)"  # said, not silently skipped
    assert "<html" in (out / "drift.html").read_text()[:2000].lower()


def test_the_reference_itself_is_not_flagged(project, records, tmp_path):
    p, root = project
    batch = tmp_path / "same"
    (batch / "images").mkdir(parents=True)
    rows = []
    for r in records:
        shutil.copy2(r["image"], batch / "images" / Path(r["image"]).name)
        rows.append({"id": r["id"], "image": f"images/{Path(r['image']).name}"})
    with open(batch / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "image"])
        w.writeheader()
        w.writerows(rows)
    summary = monitor.main(p, str(batch))
    assert summary["retrain"] is False and summary["status"] == "ok"
    d = json.loads((Path(p.paths.reports) / "drift" / "same" / "drift.json").read_text())
    assert not d["embedding_drift"]["drifted"]
    assert "embedding drift only" in d["loss_drift"]["note"]  # no captions: embedding drift only


def test_the_alignment_score_is_tested_when_captions_and_an_adapter_exist(params, tmp_path, base_dir, records):
    p = trained_project(params, tmp_path, base_dir, records)
    # MMD: Evidently's domain classifier is too noisy at 32 reference rows (as in the loop tests)
    p = dataclasses.replace(p, monitor=dataclasses.replace(p.monitor, min_rows=10, min_captions=5, adapter="local",
                                                           embedding=config.DriftTest("mmd", 0.015)))
    batch = _phone_batch(tmp_path / "b_phone", params)
    with pytest.raises(DriftFound):
        monitor.main(p, str(batch))
    d = json.loads((tmp_path / "reports" / "drift" / "b_phone" / "drift.json").read_text())
    assert d["loss_drift"]["score"] is not None and d["loss_drift"]["reference"] == "val split"
    assert d["loss_drift"]["method"] == "ks" and isinstance(d["loss_drift"]["drifted"], bool)


def test_empty_unreadable_and_missing_batches(project, params, tmp_path):
    p, _ = project
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.csv").write_text("id,image,caption\n")
    s = monitor.main(p, str(empty))
    assert s["status"] == "empty" and s["retrain"] is False
    bad = _phone_batch(tmp_path / "bad", params, n=30)
    for f in sorted((bad / "images").iterdir())[:25]:
        f.write_bytes(b"not an image at all")
    s = monitor.main(p, str(bad))
    assert s["status"] == "unreadable" and s["retrain"] is False and "not drift" in s["reasons"][0]
    d = json.loads((Path(p.paths.reports) / "drift" / "bad" / "drift.json").read_text())
    assert d["counts"]["failed"] >= 25 and d["counts"]["failed_reasons"]
    with pytest.raises(InputError, match="not found"):
        monitor.main(p, str(tmp_path / "gone"))
    assert not (Path(p.paths.reports) / "drift" / "gone").exists()  # no mark: checked again next time


@pytest.mark.slow
def test_a_re_pretrained_base_is_another_base(params, tmp_path, base_dir, records):
    """Same config, other seed: the monitor's reference is recomputed, and evaluate refuses the adapter
    trained on the old base (exit 2) naming both weights hashes."""
    import subprocess
    import sys

    from pipeline import base, model as modelmod

    from conftest import ROOT

    from pipeline import train

    p = trained_project(params, tmp_path, base_dir, records)  # the project; then a base and adapter of its own
    os.unlink(tmp_path / "models" / "base")
    base.main(p)
    train.run(p, records[:24], records[24:32])
    cache = tmp_path / "drift-cache"
    old = monitor.FixedEncoder(p)
    ref_old = monitor.reference_embeddings(old, records[:8], cache)
    base.main(dataclasses.replace(p, base=dataclasses.replace(p.base, seed=1)))  # re-pre-trained, same config
    new = monitor.FixedEncoder(p)
    assert new.model.config.to_dict() == old.model.config.to_dict()
    assert new.key != old.key
    ref_new = monitor.reference_embeddings(new, records[:8], cache)
    assert len(list(cache.glob("reference-*.npy"))) == 2 and not (ref_new == ref_old).all()
    (tmp_path / "params.json").write_text(json.dumps(dataclasses.asdict(p)))  # JSON is YAML
    r = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--params", str(tmp_path / "params.json")],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr[-2000:]
    trained_on = json.loads((tmp_path / "models" / "adapter" / "pipeline_meta.json").read_text())["base_weights_sha256"]
    assert trained_on == old.key and f"trained on base weights {old.key}" in r.stderr and new.key in r.stderr
    assert modelmod.weights_sha256(str(tmp_path / "models" / "base")) == new.key
