"""curate: every bad row quarantined with its reason, nothing lost, chat-format samples out."""
import csv
import dataclasses
import json
import os
import shutil

import pytest
from PIL import Image

from pipeline import checks, curate, data as dataio
from pipeline.errors import InputError

from conftest import ALL_FAULTS, make_dataset

EXPECTED = {  # injected fault -> the reason curate must give
    "vague": "vague_caption",
    "corrupt": "unreadable_image",
    "not_image": "not_an_image",
    "empty_file": "empty_file",
}


def _cfg(params, **kw):
    mm = dataclasses.replace(params.curate.mismatch, enabled=False)
    return dataclasses.replace(params.curate, mismatch=mm, **kw)


def _curate(folder, params, **kw):
    rows = dataio.read_manifest(dataio.find_manifest(folder))
    return curate.run(rows, folder, _cfg(params, **kw), params.data)


def test_every_injected_fault_is_quarantined_with_the_right_reason(faulty_set, params):
    truth = {r["id"]: r for r in csv.DictReader(open(faulty_set / "truth.csv"))}
    result = _curate(faulty_set, params)
    reasons = {q["id"]: q["reasons"] for q in result.quarantined}
    for rid, t in truth.items():
        if t["fault"] in EXPECTED:
            assert reasons.get(rid) == [EXPECTED[t["fault"]]], (rid, t["fault"], reasons.get(rid))
        elif t["fault"] in ("exact_duplicate", "near_duplicate"):
            assert reasons.get(rid) == [f"duplicate_of:{t['source_id']}"], (rid, t["fault"], reasons.get(rid))
        else:  # clean rows (and swapped captions, which only the mismatch model can see) pass these checks
            assert rid not in reasons, (rid, reasons.get(rid))
    r = result.report
    assert r["rows_in"] == len(truth) == r["accepted"] + r["quarantined"]


def test_accepted_samples_are_in_the_chat_format(faulty_set, params):
    result = _curate(faulty_set, params)
    s = result.accepted[0]
    roles = [m["role"] for m in s["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert s["messages"][1]["content"][0] == {"type": "image"}
    assert s["messages"][1]["content"][1]["text"] == params.data.prompt
    assert s["messages"][2]["content"][0]["text"].startswith("This lesion shows")
    assert s["subgroups"]["fitzpatrick"] in {"I", "II", "III", "IV", "V", "VI"}
    assert len(s["image_sha256"]) == 64 and s["patient_id"] and s["label"] in params.data.labels


def test_specificity_rule_uses_the_vague_list_and_vocabulary(params):
    cfg = params.curate
    words, terms = checks.specificity("Abnormal lesion, concerning, needs follow-up.", cfg)
    assert terms == 0 and words < cfg.min_words
    words, terms = checks.specificity("This lesion shows asymmetry in one axis and three colours.", cfg)
    assert terms >= 2 and words >= cfg.min_words


# --------------------------------------------------------------------------------------- bad input
def _write_manifest(folder, rows, columns=("id", "image", "caption", "label")):
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def bad_set(tmp_path, clean_set):
    """A dataset with one good row and one row of every kind of bad input."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    src = sorted((clean_set / "images").glob("*.png"))
    good = [r for r in csv.DictReader(open(clean_set / "manifest.csv"))]
    cap, label = good[0]["caption"], good[0]["label"]
    for i in range(3):
        shutil.copy(src[i], root / "images" / f"ok{i}.png")
    payload = src[3].read_bytes()
    (root / "images" / "truncated.png").write_bytes(payload[: len(payload) // 3])
    (root / "images" / "zero.png").write_bytes(b"")
    (root / "images" / "text.png").write_text("not an image\n")
    Image.new("L", (6000, 6000)).save(root / "images" / "bomb.png")  # 36 Mpx in a few kB
    Image.new("RGB", (8, 8)).save(root / "images" / "tiny.png")
    outside = tmp_path / "outside.png"
    shutil.copy(src[4], outside)
    os.symlink(outside, root / "images" / "link.png")
    rows = [
        dict(id="ok0", image="images/ok0.png", caption=cap, label=label),
        dict(id="truncated", image="images/truncated.png", caption=cap, label=label),
        dict(id="zero", image="images/zero.png", caption=cap, label=label),
        dict(id="text", image="images/text.png", caption=cap, label=label),
        dict(id="bomb", image="images/bomb.png", caption=cap, label=label),
        dict(id="tiny", image="images/tiny.png", caption=cap, label=label),
        dict(id="dotdot", image="../outside.png", caption=cap, label=label),
        dict(id="absolute", image=str(outside), caption=cap, label=label),
        dict(id="symlink", image="images/link.png", caption=cap, label=label),
        dict(id="missing", image="images/nope.png", caption=cap, label=label),
        dict(id="nocaption", image="images/ok1.png", caption="", label=label),
        dict(id="blank", image="images/ok1.png", caption="   \t ", label=label),
        dict(id="long", image="images/ok1.png", caption=cap + " x" * 2000, label=label),
        dict(id="unknown", image="images/ok2.png", caption=cap.replace(label, "eczema"), label="eczema"),
        dict(id="conflict", image="images/ok2.png", caption=cap, label=next(l for l in ("benign", "melanoma") if l != label)),
        dict(id="ok0", image="images/ok1.png", caption=cap, label=label),
        dict(id="", image="images/ok1.png", caption=cap, label=label),
    ]
    _write_manifest(root, rows)
    # undecodable bytes in one caption
    with open(root / "manifest.csv", "ab") as fh:
        fh.write(b"badbytes,images/ok2.png,Caf\xe9 \xff lesion with asymmetry in one axis,benign\n")
    return root


EXPECTED_BAD = {
    "truncated": "unreadable_image", "zero": "empty_file", "text": "not_an_image", "bomb": "image_too_large",
    "tiny": "image_too_small", "dotdot": "path_outside_dataset", "absolute": "path_outside_dataset",
    "symlink": "path_outside_dataset", "missing": "missing_image", "nocaption": "missing_caption",
    "blank": "missing_caption", "long": "caption_too_long", "unknown": "unknown_label",
    "conflict": "label_conflict", "badbytes": "bad_encoding",
}


def test_each_bad_input_is_quarantined_with_its_reason(bad_set, params):
    result = _curate(bad_set, params)
    by_row = {q["row"]: q for q in result.quarantined}
    quarantined = {q["id"]: q["reasons"] for q in result.quarantined}
    for rid, reason in EXPECTED_BAD.items():
        assert reason in quarantined[rid], (rid, quarantined.get(rid))
    assert by_row[15]["reasons"] == ["duplicate_id"]  # the second 'ok0'
    assert by_row[16]["reasons"] == ["missing_field:id"]
    assert [a["id"] for a in result.accepted] == ["ok0"]
    assert result.report["rows_in"] == 18 == result.report["accepted"] + result.report["quarantined"]


def test_bad_bytes_are_kept_visibly_in_quarantine(bad_set, params, tmp_path):
    result = _curate(bad_set, params)
    q = next(q for q in result.quarantined if q["id"] == "badbytes")
    assert "\\xe9" in q["caption"] and "\\xff" in q["caption"]
    dataio.write_jsonl(tmp_path / "q.jsonl", result.quarantined)  # serialisable as UTF-8
    assert json.loads((tmp_path / "q.jsonl").read_text().splitlines()[-1])["id"] == "badbytes"


def test_manifest_missing_required_column_is_an_input_error(tmp_path):
    _write_manifest(tmp_path, [dict(id="a", image="a.png")], columns=("id", "image"))
    with pytest.raises(InputError, match=r"missing required column.*caption"):
        dataio.read_manifest(tmp_path / "manifest.csv")


def test_unreadable_manifest_is_an_input_error(tmp_path):
    (tmp_path / "manifest.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="cannot read the manifest"):
        dataio.read_manifest(dataio.find_manifest(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no manifest"):
        dataio.find_manifest(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        dataio.find_manifest(tmp_path / "nowhere")


def test_jsonl_and_parquet_manifests_read_like_csv(clean_set, tmp_path):
    import pandas as pd

    rows = dataio.read_manifest(clean_set / "manifest.csv")
    df = pd.DataFrame(rows)
    df.to_json(tmp_path / "manifest.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "manifest.parquet")
    assert dataio.read_manifest(tmp_path / "manifest.jsonl") == rows
    assert dataio.read_manifest(tmp_path / "manifest.parquet") == rows


def test_main_writes_all_outputs_or_nothing(bad_set, params, tmp_path, monkeypatch):
    out = tmp_path / "curated"
    p = dataclasses.replace(params, paths=dataclasses.replace(params.paths, raw=str(bad_set), curated=str(out)),
                            curate=_cfg(params), data=dataclasses.replace(params.data, subgroups=()))  # no such column
    report = curate.main(p)
    assert sorted(f.name for f in out.iterdir()) == ["quarantine.jsonl", "report.json", "samples.jsonl"]
    assert report["accepted"] == 1
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("crash while writing")

    monkeypatch.setattr(dataio, "write_json", boom)
    with pytest.raises(RuntimeError):
        curate.main(p)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the old complete output survives
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no scratch left


def test_ids_are_unique_per_source_not_across_sources(params, tmp_path):
    """A batch may reuse the raw dataset's ids (another hospital's numbering): not `duplicate_id`; its
    samples are namespaced `<batch>/<id>`. Within one source a repeated id is still quarantined."""
    clean = {k: 0.0 for k in ALL_FAULTS}
    raw = make_dataset(tmp_path / "raw", params, n=12, image_size=64, seed=21, faults=clean)
    make_dataset(tmp_path / "batches" / "b1", params, n=12, image_size=64, seed=23, faults=clean)
    rows = curate.read_rows(raw, tmp_path / "batches")
    raw_ids = {r["id"] for r in rows if checks.ROOT_KEY not in r}
    batch_ids = {r["id"] for r in rows if checks.ROOT_KEY in r}
    assert raw_ids & batch_ids  # the same site's numbering: the ids collide
    cfg = dataclasses.replace(params.curate, mismatch=dataclasses.replace(params.curate.mismatch, enabled=False))
    res = curate.run(rows, raw, cfg, params.data, image_prefix=str(raw))
    assert not any("duplicate_id" in q["reasons"] for q in res.quarantined)
    from_batch = [r["id"] for r in res.accepted if r["image"].startswith(str(tmp_path / "batches"))]
    assert from_batch and all(i.startswith("b1/") and i[3:] in batch_ids for i in from_batch)
    assert {r["id"] for r in res.accepted} >= raw_ids - {q["id"] for q in res.quarantined}
    again = rows + [dict(rows[0])]  # one more row with a raw id, in the raw source
    res = curate.run(again, raw, cfg, params.data, image_prefix=str(raw))
    assert sum("duplicate_id" in q["reasons"] for q in res.quarantined) == 1
