"""ingest: a labelled batch becomes a new raw batch (nothing existing touched), a held-out evaluation
set and a frozen old test set, params.yaml is edited with its comments kept, and a second ingest of the
same batch is refused; split keeps pinned patients in test."""
import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline import checks, config, curate, data as dataio, ingest, split
from pipeline.errors import InputError

from conftest import ALL_FAULTS, ROOT, make_dataset


def test_ingest_adds_a_batch_without_touching_the_raw_data(params, tmp_path, records, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    clean = {k: 0.0 for k in ALL_FAULTS}
    make_dataset(tmp_path / "data" / "raw", params, n=12, image_size=64, seed=21, faults=clean)
    before = {p: p.read_bytes() for p in (tmp_path / "data" / "raw").rglob("*") if p.is_file()}
    sp = tmp_path / "data" / "split"
    sp.mkdir(parents=True)
    dataio.write_jsonl(sp / "test.jsonl", records[32:])
    dataio.write_jsonl(sp / "train.jsonl", records[:24])
    batch = make_dataset(tmp_path / "data" / "incoming" / "b1", params, n=30, image_size=64, seed=22,
                         site="hospital_b", camera="phone", faults=clean)
    p = config.load("params.yaml")
    out = ingest.main(p, str(batch), "params.yaml")
    assert out["train_rows"] + out["held_out_rows"] == 30 and out["held_out_rows"] > 0
    after = {p: p.read_bytes() for p in (tmp_path / "data" / "raw").rglob("*") if p.is_file()}
    assert all(after[k] == v for k, v in before.items())  # raw data immutable: only new files added
    new = dataio.read_manifest(tmp_path / "data" / "batches" / "b1" / "manifest.csv")
    held = dataio.read_jsonl(tmp_path / "data" / "eval" / "b1" / "samples.jsonl")
    assert {r["patient_id"] for r in new}.isdisjoint({r["patient_id"] for r in held})
    assert (tmp_path / "data" / "eval" / "b1" / "old_test.jsonl").read_bytes() == (sp / "test.jsonl").read_bytes()
    rows = curate.read_rows(tmp_path / "data" / "raw", tmp_path / "data" / "batches")
    assert len(rows) == 12 + len(new) and rows[-1][checks.ROOT_KEY] == str(tmp_path / "data" / "batches" / "b1")
    res = curate.run(rows, tmp_path / "data" / "raw", dataclasses.replace(p.curate, mismatch=dataclasses.replace(
        p.curate.mismatch, enabled=False)), p.data, image_prefix="data/raw")
    from_batch = [r for r in res.accepted if r["site"] == "hospital_b"]
    assert len(from_batch) == len(new) and all(Path(r["image"]).is_file() for r in res.accepted)
    text = (tmp_path / "params.yaml").read_text()
    assert "# Every hyperparameter, path and threshold" in text  # comments kept
    q = config.load("params.yaml")
    assert q.train.peft.method == "qlora" and q.promote.improve_on == ("b1",)
    assert q.evaluate.sets == {"b1": "data/eval/b1/samples.jsonl", "b1_old_test": "data/eval/b1/old_test.jsonl"}
    assert q.split.pinned_test == ("data/eval/b1/old_test.jsonl",)
    # the base's captions frozen as they were: a re-fine-tune starts from the champion's base
    assert q.base.captions == out["base_captions_frozen"] == "data/eval/b1/base_captions.jsonl"
    assert (tmp_path / q.base.captions).read_bytes() == (sp / "train.jsonl").read_bytes()
    with pytest.raises(InputError, match="already ingested"):
        ingest.main(q, str(batch), "params.yaml")
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["split"]["pinned_test"] == ["data/eval/b1/old_test.jsonl"]


def test_a_held_out_image_that_duplicates_a_training_image_is_dropped(params, tmp_path, records, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    clean = {k: 0.0 for k in ALL_FAULTS}
    (tmp_path / "data" / "split").mkdir(parents=True)
    dataio.write_jsonl(tmp_path / "data" / "split" / "test.jsonl", records[32:])
    batch = make_dataset(tmp_path / "data" / "incoming" / "b2", params, n=30, image_size=64, seed=24,
                         site="hospital_b", camera="phone", faults=clean)
    rows = dataio.read_manifest(batch / "manifest.csv")
    p = config.load("params.yaml")
    held = ingest.patient_holdout([r["patient_id"] for r in rows], p.ingest.holdout, p.ingest.seed)
    trained = next(r for r in rows if r["patient_id"] not in held)
    copied = next(r for r in rows if r["patient_id"] in held)
    shutil.copy2(batch / trained["image"], batch / copied["image"])  # the same photograph, held out
    out = ingest.main(p, str(batch), "params.yaml")
    kept = {r["id"] for r in dataio.read_jsonl(tmp_path / "data" / "eval" / "b2" / "samples.jsonl")}
    assert out["held_out_duplicates_of_training"] == 1 and copied["id"] not in kept
    assert out["held_out_accepted"] == len(kept) == out["held_out_rows"] - 1


def test_an_unlabelled_batch_is_refused(params, tmp_path):
    batch = tmp_path / "b"
    (batch / "images").mkdir(parents=True)
    (batch / "manifest.csv").write_text("id,image,caption\na,images/a.png,\n")
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "test.jsonl").write_text("")
    p = dataclasses.replace(params, paths=dataclasses.replace(params.paths, raw=str(tmp_path / "raw"),
                                                              eval=str(tmp_path / "eval"), split=str(tmp_path / "split")))
    with pytest.raises(InputError, match="not labelled"):
        ingest.main(p, str(batch), str(tmp_path / "params.yaml"))


def test_pinned_patients_stay_in_test(params, records):
    free = split.run(records, params.split, params.data)
    in_train = {r["patient_id"] for r in free.splits["train"]}
    pinned = frozenset(sorted(in_train)[:3])
    res = split.run(records, params.split, params.data, pinned)
    outside = [r["id"] for s, v in res.splits.items() if s != "test" for r in v if r["patient_id"] in pinned]
    assert outside == [] and pinned <= {r["patient_id"] for r in res.splits["test"]}
    assert res.report["patient_overlap"] == 0
