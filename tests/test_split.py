"""split: stratum shares within tolerance, no patient in two splits, same seed same files."""
import dataclasses
import hashlib
from collections import Counter

import pytest

from pipeline import chat, split, synth
from pipeline.errors import InputError


def _records(params, n=600, seed=0):
    """Curated-shaped records from the synthetic plan (no images needed)."""
    cfg = dataclasses.replace(params.synth, n=n, seed=seed)
    out = []
    for l in synth.plan_lesions(cfg, params.data.labels):
        out.append({
            "id": l.id, "image": f"images/{l.id}.png", "image_sha256": hashlib.sha256(l.id.encode()).hexdigest(),
            "messages": chat.messages(synth.caption_of(l), params.data.prompt, params.data.system_prompt),
            "label": l.label, "subgroups": {"fitzpatrick": l.fitzpatrick}, "patient_id": l.patient_id,
            "site": l.site, "camera": l.camera, "source": "synthetic", "quality": {},
        })
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_every_stratum_share_is_within_tolerance(params, seed):
    records = _records(params, seed=seed)
    result = split.run(records, dataclasses.replace(params.split, seed=seed), params.data)
    strata = [split.stratum_of(r, params.data.subgroups) for r in records]
    total, n = Counter(strata), len(records)
    for name, recs in result.splits.items():
        got = Counter(split.stratum_of(r, params.data.subgroups) for r in recs)
        for k, c in total.items():  # recomputed here, independently of the report
            share, full = got[k] / len(recs), c / n
            expected = c * len(recs) / n
            assert abs(share - full) <= 0.02 or (c < 50 and abs(got[k] - expected) <= 1), (name, k, got[k], expected)
    assert result.report["all_within_tolerance"]
    sizes = {k: len(v) for k, v in result.splits.items()}
    f = params.split.fractions
    assert abs(sizes["train"] / n - f["train"]) < 0.02 and abs(sizes["test"] / n - f["test"]) < 0.02


def test_no_patient_in_two_splits(params):
    result = split.run(_records(params), params.split, params.data)
    seen = {}
    for name, recs in result.splits.items():
        for r in recs:
            assert seen.setdefault(r["patient_id"], name) == name
    assert result.report["patient_overlap"] == 0 and result.report["image_overlap"] == 0
    assert sum(len(v) for v in result.splits.values()) == 600


def test_same_seed_same_files_other_seed_other_split(params, tmp_path):
    records = _records(params)
    a = split.run(records, params.split, params.data)
    b = split.run(list(reversed(records)), params.split, params.data)  # input order does not matter
    c = split.run(records, dataclasses.replace(params.split, seed=9), params.data)
    assert a.splits == b.splits and a.val_mismatch == b.val_mismatch and a.report == b.report
    assert {r["id"] for r in a.splits["test"]} != {r["id"] for r in c.splits["test"]}


def test_tolerance_check_can_fail():
    strata = ["a"] * 60 + ["b"] * 40
    skewed = ["train"] * 60 + ["test"] * 40  # every 'b' in test
    rows = split.stratum_table(strata, skewed, ["train", "test"])
    assert not all(r["within_tolerance"] for r in rows)


def test_small_strata_are_merged_and_recorded(params):
    records = _records(params, n=300)
    for r in records[:3]:  # a rare subgroup value
        r["subgroups"] = {"fitzpatrick": "unknown"}
    result = split.run(records, params.split, params.data)
    merges = result.report["merges"]
    assert any(k.endswith("|unknown") for k in merges)
    assert all(v.endswith("|*") or v == "*" for v in merges.values())


def test_val_mismatch_has_known_swapped_captions(params):
    result = split.run(_records(params), params.split, params.data)
    val = {r["id"]: r for r in result.splits["val"]}
    mm = result.val_mismatch
    matched = [r for r in mm if not r["mismatched"]]
    swapped = [r for r in mm if r["mismatched"]]
    assert len(matched) == len(val) and len(swapped) == round(params.split.mismatch_fraction * len(val))
    for r in swapped:
        original = val[r["id"].split("#")[0]]
        said = chat.parse_label(chat.answer(r["messages"]), params.data.label_pattern, params.data.labels)
        assert said == r["caption_label"] != original["label"] == r["label"]
        assert r["image"] == original["image"]


def test_bad_fractions_and_empty_input_are_input_errors(params):
    with pytest.raises(InputError, match="sum to 1"):
        split.run(_records(params, n=50), dataclasses.replace(params.split, fractions={"train": 0.5, "val": 0.2, "test": 0.2}), params.data)
    with pytest.raises(InputError, match="no curated samples"):
        split.run([], params.split, params.data)


def test_samples_without_patient_are_their_own_group(params):
    records = _records(params, n=200)
    for r in records:
        r["patient_id"] = r["id"]
    result = split.run(records, params.split, params.data)
    assert result.report["all_within_tolerance"] and result.report["patient_overlap"] == 0


def test_main_writes_the_same_bytes_for_the_same_seed(params, tmp_path):
    from pipeline import data as dataio

    (tmp_path / "cur").mkdir()
    dataio.write_jsonl(tmp_path / "cur" / "samples.jsonl", _records(params, n=200))
    outs = []
    for name in ("a", "b"):
        paths = dataclasses.replace(params.paths, curated=str(tmp_path / "cur"), split=str(tmp_path / name))
        split.main(dataclasses.replace(params, paths=paths))
        outs.append({f.name: f.read_bytes() for f in sorted((tmp_path / name).iterdir())})
    assert outs[0] == outs[1] and set(outs[0]) == {"train.jsonl", "val.jsonl", "test.jsonl", "val_mismatch.jsonl", "report.json"}
