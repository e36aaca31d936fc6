"""synth: deterministic bytes, skin tones in their ITA range, captions true to the ground truth."""
import csv
import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from pipeline import synth

from conftest import ALL_FAULTS, make_dataset


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, params):
    kw = dict(n=24, image_size=64, faults=ALL_FAULTS)
    a = make_dataset(tmp_path / "a", params, seed=11, **kw)
    b = make_dataset(tmp_path / "b", params, seed=11, **dict(kw))
    c = make_dataset(tmp_path / "c", params, seed=12, **dict(kw))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_tds_and_label_follow_the_abcd_rule():
    assert synth.total_dermoscopy_score(2, 8, 6, 5) == pytest.approx(8.9)
    assert synth.label_of(4.74) == "benign" and synth.label_of(4.75) == "suspicious"
    assert synth.label_of(5.45) == "suspicious" and synth.label_of(5.46) == "melanoma"
    rng = np.random.default_rng(0)
    for label in ("benign", "suspicious", "melanoma"):
        for _ in range(20):
            a, b, c, d = synth.sample_attributes(rng, label)
            assert 0 <= a <= 2 and 0 <= b <= 8 and 1 <= len(c) <= 6 and 1 <= len(d) <= 5
            assert synth.label_of(synth.total_dermoscopy_score(a, b, len(c), len(d))) == label


def test_typical_attributes_carry_each_class_signs_and_uniform_ones_do_not():
    rng = np.random.default_rng(1)
    for _ in range(30):
        a, b, c, d = synth.sample_attributes(rng, "benign")
        assert set(c) <= {"light brown", "dark brown"} and set(d) <= {"pigment network", "structureless areas"}
        a, b, c, d = synth.sample_attributes(rng, "suspicious")
        assert set(c) & {"white", "red"} and not set(c) & {"blue-grey", "black"}
        assert set(d) & {"dots", "globules"} and "streaks" not in d
        a, b, c, d = synth.sample_attributes(rng, "melanoma")
        assert {"blue-grey", "black"} <= set(c) and "streaks" in d
    uniform = [synth.sample_attributes(rng, "benign", mode="uniform")[2] for _ in range(60)]
    assert any(set(c) & {"blue-grey", "black", "white", "red"} for c in uniform)
    with pytest.raises(synth.InputError, match="typical or uniform"):
        synth.sample_attributes(rng, "benign", mode="other")


def test_typical_labels_are_legible_from_colour_histograms(tmp_path, params):
    """The default benchmark can be read from the image at low resolution (a colour-histogram classifier
    separates the classes); the uniform one cannot (its labels must be counted out of ABCD attributes)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import cross_val_score

    def score(mode):
        folder = make_dataset(tmp_path / mode, params, n=240, image_size=64, seed=4, attributes=mode,
                              faults={k: 0.0 for k in ALL_FAULTS})
        X, y = [], []
        for r in csv.DictReader(open(folder / "manifest.csv")):
            q = (np.asarray(Image.open(folder / r["image"]).convert("RGB"), np.float32) / 64).astype(int).clip(0, 3)
            X.append(np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64) / q[..., 0].size)
            y.append(r["label"])
        clf = HistGradientBoostingClassifier(max_iter=100, random_state=0)
        return cross_val_score(clf, np.array(X), np.array(y), cv=4, scoring="f1_macro").mean()

    typical, uniform = score("typical"), score("uniform")
    assert typical >= 0.9 and uniform <= 0.7, (typical, uniform)


def _background_ita(path, size):
    """ITA of the skin ring between the lesion and the dermatoscope's field edge."""
    rgb = np.asarray(Image.open(path).convert("RGB"), np.float64) / 255
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    ring = (np.hypot(xx, yy) > 0.93) & (np.hypot(xx, yy) < 1.02)
    lab = synth.srgb_to_lab(rgb[ring])
    return float(np.degrees(np.arctan2(np.median(lab[:, 0]) - 50, np.median(lab[:, 2]))))


def test_backgrounds_fall_in_their_fitzpatrick_ita_range(tmp_path, params):
    folder = make_dataset(tmp_path / "d", params, n=120, image_size=64, seed=2,
                          faults={k: 0.0 for k in ALL_FAULTS})
    rows = list(csv.DictReader(open(folder / "manifest.csv")))
    assert {r["fitzpatrick"] for r in rows} == set(synth.FITZPATRICK)  # every type is drawn
    hits = [synth.fitzpatrick_of_ita(_background_ita(folder / r["image"], 64)) == r["fitzpatrick"] for r in rows]
    assert np.mean(hits) >= 0.95


def test_lab_conversion_round_trips():
    rgb = np.random.default_rng(0).uniform(0, 1, (100, 3))
    assert np.allclose(synth.lab_to_srgb(synth.srgb_to_lab(rgb)), rgb, atol=2e-3)


def test_captions_mention_only_attributes_the_metadata_holds(faulty_set):
    truth = {r["id"]: r for r in csv.DictReader(open(faulty_set / "truth.csv"))}
    rows = list(csv.DictReader(open(faulty_set / "manifest.csv")))
    checked = 0
    for r in rows:
        t = truth[r["id"]]
        if t["fault"] in ("vague", "mismatch"):
            continue
        cap = r["caption"]
        colours = t["colours"].split(";")
        structures = t["structures"].split(";")
        named = re.search(r"colours? \(([^)]*)\)", cap).group(1).split(", ")
        assert named == colours
        for s in synth.STRUCTURES:
            assert (s in cap) == (s in structures), (s, cap)
        a = int(t["asymmetry"])
        assert ("symmetric shape" in cap) == (a == 0)
        assert ("one axis" in cap) == (a == 1) and ("two axes" in cap) == (a == 2)
        b = int(t["border"])
        assert (f"in {synth.NUMBER_WORDS[b]} of eight" in cap) or (b == 0 and "no abrupt" in cap)
        assert f"score of {float(t['tds']):.2f}" in cap
        assert cap.endswith(f"Clinical impression: {t['image_label']}.") and r["label"] == t["image_label"]
        checked += 1
    assert checked >= 80


def test_faults_are_injected_and_recorded(faulty_set):
    truth = list(csv.DictReader(open(faulty_set / "truth.csv")))
    kinds = {t["fault"] for t in truth}
    assert kinds == {"none", "vague", "mismatch", "exact_duplicate", "near_duplicate", "corrupt", "not_image", "empty_file"}
    by_id = {t["id"]: t for t in truth}
    rows = {r["id"]: r for r in csv.DictReader(open(faulty_set / "manifest.csv"))}
    for t in truth:
        if t["fault"] == "mismatch":  # the caption (and its label) come from a lesion of another label
            src = by_id[t["source_id"]]
            assert src["image_label"] != t["image_label"]
            assert rows[t["id"]]["label"] == src["image_label"]
        if t["fault"] == "exact_duplicate":
            a = (faulty_set / rows[t["id"]]["image"]).read_bytes()
            assert a == (faulty_set / rows[t["source_id"]]["image"]).read_bytes()
        if t["fault"] == "empty_file":
            assert (faulty_set / rows[t["id"]]["image"]).stat().st_size == 0


def test_spurious_darkness_darkens_benign_lesions_only(tmp_path, params):
    cfg = params.synth.__class__(n=60, seed=1, spurious_darkness=1.0)
    lesions = synth.plan_lesions(cfg, params.data.labels)
    assert all(l.dark == (l.label == "benign") for l in lesions)


def test_phone_camera_writes_jpeg_with_a_colour_cast(tmp_path, params):
    folder = make_dataset(tmp_path / "p", params, n=6, image_size=64, seed=4, camera="phone",
                          faults={k: 0.0 for k in ALL_FAULTS})
    rows = list(csv.DictReader(open(folder / "manifest.csv")))
    assert all(r["image"].endswith(".jpg") and r["camera"] == "phone" for r in rows)
    assert Image.open(folder / rows[0]["image"]).format == "JPEG"


def test_several_sites_alternate_by_patient_and_bad_camera_is_an_input_error(params):
    from pipeline.errors import InputError

    cfg = params.synth.__class__(n=40, seed=1, site="a,b", camera="dermatoscope,phone")
    lesions = synth.plan_lesions(cfg, params.data.labels)
    assert {(l.site, l.camera) for l in lesions} == {("a", "dermatoscope"), ("b", "phone")}
    assert all(l.patient_id.startswith(l.site + "-") for l in lesions)
    with pytest.raises(InputError, match="unknown camera 'webcam'"):
        synth.plan_lesions(params.synth.__class__(n=4, camera="webcam"), params.data.labels)
