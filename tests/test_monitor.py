"""monitor: a batch from another camera is flagged and one from the reference is not; the report has
the docs/design.md §3.6 fields; empty, caption-less, mostly unreadable and vanished batches are handled."""
import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline import chat, config, data as dataio, monitor
from pipeline.errors import DriftFound, InputError

from conftest import ALL_FAULTS, make_dataset, small_eval, tiny, trained_project


def _reference_project(p, root: Path, base_dir: Path, train: list[dict], val: list[dict]):
    """`p`'s split (the monitor's reference) written from `train` and `val`, the session's base linked in."""
    sp = Path(p.paths.split)
    sp.mkdir(parents=True)
    dataio.write_jsonl(sp / "train.jsonl", train)
    dataio.write_jsonl(sp / "val.jsonl", val)
    (root / "models").mkdir()
    os.symlink(base_dir, root / "models" / "base")
    return p


@pytest.fixture(scope="module")
def project(tmp_path_factory, params, base_dir, records):
    """A project whose split (the reference) is the 40-lesion clean set, sharing the session's base."""
    root = tmp_path_factory.mktemp("monitor")
    p = _reference_project(small_eval(tiny(params, root)), root, base_dir, records[:32], records[32:])
    # 32 + 8 reference rows: no strata here (a label x skin-type cell would hold a row or two)
    m = dataclasses.replace(p.monitor, min_rows=10, min_captions=5, adapter="local", condition_on=())
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
    assert set(d["embedding_drift"]) >= {"method", "score", "threshold", "drifted", "p_value"}
    assert set(d["loss_drift"]) >= {"method", "score", "threshold", "drifted"}
    cov = d["kinds"]["covariate"]
    assert d["embedding_drift"]["drifted"] and cov["p_adjusted"] < d["alpha"] == d["embedding_drift"]["threshold"]
    assert len(cov["null"]) == 1999 and sum(v >= cov["value"] for v in cov["null"]) <= 1  # p <= 2 / 2000
    assert set(d["kinds"]) == set(monitor.KINDS) and "covariate" in d["drifted_kinds"]
    assert d["retrain"] is True and d["status"] == "drift" and d["reasons"][0].startswith("covariate: drift")
    assert "the F1 drop could not be measured" in d["reasons"][-1]  # no champion: drift alone, and said so
    assert d["loss_drift"]["note"] == "no adapter (run train)"  # said, not silently skipped
    page = (out / "drift.html").read_text()
    assert "<html" in page[:2000].lower() and "Permutation tests (the decision)" in page and "<svg" in page


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
    assert "no text or alignment test" in d["loss_drift"]["note"]  # no captions: said, not silently skipped
    assert d["kinds"]["text"]["p_value"] is None and d["kinds"]["subgroup"]["p_value"] is None  # no columns


def test_the_alignment_score_is_tested_when_captions_and_an_adapter_exist(params, tmp_path, base_dir, records):
    p = trained_project(params, tmp_path, base_dir, records)
    p = dataclasses.replace(p, monitor=dataclasses.replace(p.monitor, min_rows=10, min_captions=5, adapter="local",
                                                           condition_on=(), harm_rows=20))
    batch = _phone_batch(tmp_path / "b_phone", params)
    s = monitor.main(p, str(batch))  # the 4-step model answers nothing on val or batch: no F1 drop, an alert
    assert s["status"] == "alert" and s["retrain"] is False and "alert only" in s["reasons"][-1]
    d = json.loads((tmp_path / "reports" / "drift" / "b_phone" / "drift.json").read_text())
    assert d["loss_drift"]["score"] is not None and d["loss_drift"]["reference"] == "val split"
    assert d["loss_drift"]["method"] == "ks permutation test" and isinstance(d["loss_drift"]["drifted"], bool)
    al = d["kinds"]["alignment"]
    assert al["statistic_of"] == "per-pair InfoNCE loss" and al["p_value"] is not None and "cosine" in al
    assert d["harm"]["measured"] is True and d["harm"]["reference_rows"] == 8 and len(d["harm"]["interval"]) == 2
    assert d["harm"]["rows"] == d["embedding_drift"]["current_rows"] == 16  # one image per patient: 16 patients


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


# ------------------------------------------------------------- what calls for a re-fine-tune, what only alerts
COLOURS = {"red": (200, 50, 50), "green": (50, 200, 50), "blue": (50, 50, 200)}


def _colour_rows(root: Path, n: int, mix: dict, seed: int, cast: bool = False) -> list[dict]:
    """Images whose label is their colour, one per patient; `cast`: a camera whose colour cast rotates
    the channels, so that every colour reads as another."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names, p = list(mix), np.array(list(mix.values()), float)
    rows = []
    for i in range(n):
        label = names[int(rng.choice(len(names), p=p / p.sum()))]
        px = np.clip(np.array(COLOURS[label], float) + rng.normal(0, 25, (64, 64, 3)), 0, 255)
        if cast:
            px = px[..., [2, 0, 1]]
        f = root / "images" / f"{seed}-{i:05d}.png"
        Image.fromarray(px.astype(np.uint8)).save(f)
        rows.append({"id": f"{seed}-{i:05d}", "image": f"images/{f.name}", "label": label, "patient_id": f"{seed}-p{i}",
                     "fitzpatrick": ["I", "II", "III", "IV", "V", "VI"][int(rng.integers(6))]})
    return rows


def _write_batch(root: Path, rows: list[dict]) -> Path:
    """The rows as a batch folder, without captions (the curation checks would call these vague)."""
    rows = [{k: v for k, v in r.items() if k != "caption"} for r in rows]
    with open(root / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def colour_champion(tmp_path_factory, params, base_dir):
    """A champion that answers an image's colour in one word: a domain the 30-step base and a 400-step
    adapter learn (val macro-F1 about 0.7), where the lesion answers would need a real base."""
    from pipeline import train

    root = tmp_path_factory.mktemp("colour")
    data = dataclasses.replace(params.data, labels=tuple(COLOURS), positive_label="red", prompt="Colour?",
                               system_prompt="", label_pattern=r"^(red|green|blue)")
    rows = _colour_rows(root / "data", 48, {k: 1 for k in COLOURS}, seed=0)
    recs = [{"id": r["id"], "image": str(root / "data" / r["image"]), "label": r["label"], "patient_id": r["patient_id"],
             "subgroups": {"fitzpatrick": r["fitzpatrick"]}, "messages": chat.messages(r["label"], "Colour?")}
            for r in rows]
    p = small_eval(tiny(dataclasses.replace(params, data=data), root, max_steps=400, epochs=400,
                        lr=config.Lr(vision=0.003, text=0.003)))
    train.run(_reference_project(p, root, base_dir, recs[:36], recs[36:]), recs[:36], recs[36:])
    m = dataclasses.replace(p.monitor, adapter="local", condition_on=("label",), harm_rows=60)
    return dataclasses.replace(p, monitor=m), root


def test_a_label_mix_change_alone_raises_an_alert_and_no_re_fine_tune(colour_champion, tmp_path):
    p, _ = colour_champion
    rows = _colour_rows(tmp_path / "mix", 1000, {"red": 8, "green": 1, "blue": 1}, seed=7)
    for r in rows[:5]:
        r["label"] = "purple"  # not one of data.labels: counted, named, left out of the label-mix test
    batch = _write_batch(tmp_path / "mix", rows)
    s = monitor.main(p, str(batch))  # no DriftFound: exit 0, the DAG triggers nothing
    d = json.loads((Path(p.paths.reports) / "drift" / "mix" / "drift.json").read_text())
    assert s["status"] == "alert" and s["retrain"] is False and d["drifted_kinds"] == ["prevalence"], d["reasons"]
    assert d["kinds"]["prevalence"]["source"] == "labels" and d["kinds"]["prevalence"]["current_mix"]["red"] > 0.7
    assert not d["kinds"]["covariate"]["drifted"] and d["kinds"]["covariate"]["conditioned_on"] == ["label"]
    assert d["kinds"]["prevalence"]["unknown_labels"] == {"purple": 5}
    assert "alert only" in d["reasons"][-1]
    # without the label strata the same batch reads as a change of the images: the strata are what name it
    flat = dataclasses.replace(p, monitor=dataclasses.replace(p.monitor, condition_on=()),
                               paths=dataclasses.replace(p.paths, reports=str(tmp_path / "flat")))
    monitor.main(flat, str(batch))
    assert json.loads((tmp_path / "flat" / "drift" / "mix" / "drift.json").read_text())["kinds"]["covariate"]["drifted"]


def test_a_camera_that_lowers_the_champions_f1_calls_for_a_re_fine_tune(colour_champion, tmp_path):
    p, _ = colour_champion
    batch = _write_batch(tmp_path / "cast", _colour_rows(tmp_path / "cast", 120, {k: 1 for k in COLOURS}, seed=8,
                                                         cast=True))
    with pytest.raises(DriftFound):
        monitor.main(p, str(batch))
    d = json.loads((Path(p.paths.reports) / "drift" / "cast" / "drift.json").read_text())
    h = d["harm"]
    assert d["retrain"] is True and d["status"] == "drift" and "covariate" in d["drifted_kinds"]
    assert h["measured"] is True and h["reference_f1"] >= 0.5, h  # the champion reads colours on val ...
    assert h["drop"] > p.monitor.max_f1_drop and h["interval"][1] < h["reference_f1"]  # ... and not through this camera
    assert "max_f1_drop" in d["reasons"][-1]
    # unlabelled, the same batch gets an estimate from the answers' confidence, not a measurement
    unlabelled = _write_batch(tmp_path / "cast_unlabelled", [{k: v for k, v in r.items() if k != "label"}
                                                             for r in _colour_rows(tmp_path / "cast_unlabelled", 120,
                                                                                   {k: 1 for k in COLOURS}, 8, True)])
    try:
        monitor.main(p, str(unlabelled))
    except DriftFound:
        pass
    u = json.loads((Path(p.paths.reports) / "drift" / "cast_unlabelled" / "drift.json").read_text())
    assert u["harm"]["measured"] is False and "Thresholded Confidence" in u["harm"]["method"]
    assert u["kinds"]["prevalence"]["source"] == "predicted by the champion"


def test_a_reference_too_small_or_too_few_permutations_stop_before_anything_is_written(colour_champion, tmp_path):
    p, _ = colour_champion
    batch = _write_batch(tmp_path / "b", _colour_rows(tmp_path / "b", 30, {k: 1 for k in COLOURS}, seed=9))
    few = dataclasses.replace(p.monitor, permutations=99)
    with pytest.raises(InputError, match=r"monitor.permutations = 99: .* use at least 1000 permutations"):
        monitor.main(dataclasses.replace(p, monitor=few), str(batch))
    small = tmp_path / "split"
    small.mkdir()
    dataio.write_jsonl(small / "train.jsonl", dataio.read_jsonl(Path(p.paths.split) / "train.jsonl")[:4])
    tiny_ref = dataclasses.replace(p, paths=dataclasses.replace(p.paths, split=str(small), reports=str(tmp_path / "r")))
    with pytest.raises(InputError, match=r"the reference holds 4 rows .* need at least 20"):
        monitor.main(tiny_ref, str(batch))
    assert not (tmp_path / "r" / "drift" / "b").exists() and not (Path(p.paths.reports) / "drift" / "b").exists()
