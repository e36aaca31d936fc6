"""evaluate: metrics equal scikit-learn's and fairlearn's, image reliance tells a model that reads the
image from one that does not, geometry and gates behave, and the stage runs end to end."""
import functools
import json

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame
from PIL import Image
from sklearn.metrics import f1_score, recall_score

from pipeline import config, evaluate, scoring
from pipeline.errors import InputError

LABELS = ("benign", "suspicious", "melanoma")


@pytest.fixture
def fixture_labels():
    rng = np.random.default_rng(0)
    y = rng.choice(LABELS, 120).tolist()
    pred = [t if rng.random() < 0.7 else rng.choice(LABELS) for t in y]
    pred[3] = None  # unparseable
    pred[10] = None
    groups = rng.choice(["I", "II", "III", "IV"], 120, p=[0.3, 0.3, 0.3, 0.1]).tolist()
    return y, pred, groups


def test_classification_equals_scikit_learn_and_counts_unparseable_as_wrong(fixture_labels):
    y, pred, _ = fixture_labels
    m = scoring.classification(y, pred, LABELS)
    as_str = ["none" if p is None else p for p in pred]
    assert m["f1_macro"] == pytest.approx(f1_score(y, as_str, labels=list(LABELS), average="macro"))
    per = f1_score(y, as_str, labels=list(LABELS), average=None)
    assert [m["f1_per_class"][l] for l in LABELS] == pytest.approx(per.tolist())
    assert m["accuracy"] == pytest.approx(np.mean([a == b for a, b in zip(y, pred)]))
    assert sum(map(sum, m["confusion"])) == len(y) and sum(row[-1] for row in m["confusion"]) == 2


def test_subgroup_table_equals_fairlearn_metricframe(fixture_labels):
    y, pred, groups = fixture_labels
    cfg = config.Bias(min_group_size=20, bootstrap=200, confidence=0.9)
    b = scoring.bias(y, pred, groups, "melanoma", cfg, seed=0)
    as_str = ["<unparseable>" if p is None else p for p in pred]

    def f1_present(yt, yp):
        return f1_score(yt, yp, labels=sorted(set(yt)), average="macro", zero_division=0)

    mf = MetricFrame(metrics={"f1": f1_present,
                              "recall": functools.partial(recall_score, labels=["melanoma"], average="macro",
                                                          zero_division=0),
                              "n": lambda yt, yp: len(yt)},
                     y_true=np.array(y), y_pred=np.array(as_str), sensitive_features=np.array(groups))
    table = mf.by_group
    assert sorted(b["groups"]) == sorted(table.index)
    for g, row in table.iterrows():
        assert b["groups"][g]["n"] == row["n"]
        assert b["groups"][g]["f1_macro"] == pytest.approx(row["f1"])
        assert b["groups"][g]["recall_melanoma"] == pytest.approx(row["recall"])
    small = [g for g in table.index if table.loc[g, "n"] < 20]
    assert b["insufficient"] == small and small  # group IV is too small: reported, not used
    big = table.drop(index=small)
    assert b["max_gap"] == pytest.approx(big["f1"].max() - big["f1"].min())
    lo, hi = b["max_gap_ci"]
    assert 0 <= lo <= hi and hi > b["max_gap"] * 0.5
    # the same seed gives the same interval; another seed another one
    assert scoring.bias(y, pred, groups, "melanoma", cfg, seed=0)["max_gap_ci"] == b["max_gap_ci"]
    assert scoring.bias(y, pred, groups, "melanoma", cfg, seed=1)["max_gap_ci"] != b["max_gap_ci"]


def test_recall_gap_of_the_positive_label_has_its_interval_and_gate(fixture_labels):
    """Equal opportunity: the largest gap in melanoma recall between groups, its bootstrap interval
    (resampled within groups), per-group intervals that hold the point value, and a gate on the upper
    bound; a model that misses the positive label in one group fails it."""
    y, pred, groups = fixture_labels
    cfg = config.Bias(min_group_size=20, bootstrap=300)
    b = scoring.bias(y, pred, groups, "melanoma", cfg, seed=0)
    judged = [g for g in b["groups"] if g not in b["insufficient"]]
    recalls = [b["groups"][g]["recall_melanoma"] for g in judged]
    assert b["max_gap_recall_melanoma"] == pytest.approx(max(recalls) - min(recalls))
    lo, hi = b["max_gap_recall_ci"]
    assert 0 <= lo <= b["max_gap_recall_melanoma"] <= hi <= 1
    for g in b["groups"]:
        for key in ("f1_macro", "recall_melanoma"):
            c = b["groups"][g][f"{key}_ci"]
            assert c[0] <= b["groups"][g][key] + 1e-9 and b["groups"][g][key] <= c[1] + 1e-9
    m = {"f1_macro": 0.9, "image_reliance": {"ignore_rate": 0.1}, "mismatch_auroc": 0.9, "bias": b}
    assert "max_recall_gap" not in scoring.gates(m, config.Gates(), cfg)  # null threshold: not judged
    assert scoring.gates(m, config.Gates(max_recall_gap=1.0, max_bias_gap=1.0), cfg)["max_recall_gap"]["value"] == hi
    # group I's melanomas all missed: its recall is 0, the gap is large and the gate fails
    missed = [("benign" if (g == "I" and t == "melanoma") else p) for t, p, g in zip(y, pred, groups)]
    b2 = scoring.bias(y, missed, groups, "melanoma", cfg, seed=0)
    assert b2["groups"]["I"]["recall_melanoma"] == 0 and b2["max_gap_recall_ci"][0] > 0.3
    g2 = scoring.gates({**m, "bias": b2}, config.Gates(max_recall_gap=0.5), cfg)
    assert not g2["max_recall_gap"]["passed"]


def test_an_insufficient_group_fails_the_bias_gate_unless_told_to_warn(fixture_labels):
    y, pred, groups = fixture_labels
    for mode, passed in (("fail", False), ("warn", True)):
        cfg = config.Bias(min_group_size=20, bootstrap=50, insufficient=mode)
        m = {"f1_macro": 0.9, "image_reliance": {"ignore_rate": 0.1}, "mismatch_auroc": 0.9,
             "bias": scoring.bias(y, pred, groups, "melanoma", cfg, 0)}
        g = scoring.gates(m, config.Gates(max_bias_gap=1.0), cfg)
        assert g["max_bias_gap"]["passed"] is passed and "IV" in g["max_bias_gap"]["note"]


def test_gates_report_value_threshold_and_failures():
    m = {"f1_macro": 0.75, "image_reliance": {"ignore_rate": 0.5}, "mismatch_auroc": None,
         "bias": {"insufficient": [], "max_gap_ci": [0.05, 0.1]}}
    g = scoring.gates(m, config.Gates(), config.Bias())
    assert g["min_f1_macro"] == {"value": 0.75, "threshold": 0.8, "op": ">=", "passed": False}
    assert not g["max_ignore_rate"]["passed"] and not g["min_mismatch_auroc"]["passed"]
    assert g["max_bias_gap"]["passed"] and g["max_bias_gap"]["value"] == 0.1
    failed = scoring.failed_gates(g)
    assert len(failed) == 3 and any(f.startswith("min_f1_macro: 0.75") for f in failed)


# -------------------------------------------------------------------------------- image reliance
COLOURS = {"benign": (200, 40, 40), "suspicious": (40, 200, 40), "melanoma": (40, 40, 200)}


def _colour_records(n=60, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = LABELS[i % 3]
        out.append({"id": f"r{i}", "label": label, "image": Image.new("RGB", (8, 8), COLOURS[label]),
                    "text_hint": label if rng.random() < 0.8 else LABELS[(i + 1) % 3]})
    return out


def _reads_image(records, images):
    """Stand-in that reads only the image: the label whose colour is closest."""
    out = []
    for im in images:
        px = np.asarray(im, float).reshape(-1, 3).mean(0)
        out.append(min(COLOURS, key=lambda k: np.abs(px - COLOURS[k]).sum()))
    return out


def _ignores_image(records, images):
    """Stand-in that reads only the text."""
    return [r["text_hint"] for r in records]


def test_a_model_that_ignores_the_image_has_ignore_rate_one_and_no_perceptual_score():
    recs = _colour_records()
    r = scoring.image_reliance(_ignores_image, recs, LABELS, permutations=5, seed=0,
                                blank=Image.new("RGB", (8, 8), (128, 128, 128)))
    assert r["ignore_rate"] == 1.0
    assert r["perceptual_score"] == pytest.approx(0.0, abs=1e-12)
    assert r["f1_blank_image"] == r["f1_shuffled_image"] > 0.6


def test_a_model_that_reads_only_the_image_has_ignore_rate_zero_and_a_large_perceptual_score():
    recs = _colour_records()
    r = scoring.image_reliance(_reads_image, recs, LABELS, permutations=5, seed=0,
                                blank=Image.new("RGB", (8, 8), (128, 128, 128)))
    assert r["ignore_rate"] == 0.0
    assert r["f1_shuffled_image"] == 0.0 and r["perceptual_score"] == pytest.approx(1.0)
    assert r["f1_blank_image"] < 0.5


def test_swaps_always_give_an_image_of_another_label_and_need_two_labels():
    y = ["a"] * 5 + ["b"] * 3 + ["c"] * 2
    swap = scoring.other_label_swaps(y, np.random.default_rng(0))
    assert all(y[i] != y[j] for i, j in enumerate(swap))
    with pytest.raises(InputError, match="two labels"):
        scoring.other_label_swaps(["a"] * 4, np.random.default_rng(0))


# -------------------------------------------------------------------------------------- geometry
def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_retrieval_counts_identical_captions_as_the_same_target_and_both_directions():
    rng = np.random.default_rng(0)
    t = _unit(rng.normal(size=(20, 8)))
    v = t.copy()
    v[0], v[1] = t[1], t[0]  # images 0 and 1 point to each other's caption
    r = scoring.retrieval(v, t, [f"c{i}" for i in range(20)])
    assert r["image_to_text"]["r@1"] == pytest.approx(18 / 20) and r["text_to_image"]["r@1"] == pytest.approx(18 / 20)
    assert r["image_to_text"]["r@5"] >= r["image_to_text"]["r@1"]
    assert scoring.retrieval(v, t, [f"c{i}" for i in range(20)], ks=(20,))["r@20"] == 1.0
    r_same = scoring.retrieval(v, t, ["same", "same"] + [f"c{i}" for i in range(2, 20)])
    assert r_same["r@1"] == 1.0


def test_geometry_matches_its_definitions():
    rng = np.random.default_rng(1)
    v, t = _unit(rng.normal(size=(30, 4)) + 3), _unit(rng.normal(size=(30, 4)) - 3)
    g = scoring.geometry(v, t)
    assert g["modality_gap"] == pytest.approx(np.linalg.norm(v.mean(0) - t.mean(0)))
    assert g["alignment"] == pytest.approx(np.mean([np.sum((a - b) ** 2) for a, b in zip(v, t)]))
    same = scoring.geometry(v, v)
    assert same["modality_gap"] == 0 and same["alignment"] == 0
    spread = _unit(rng.normal(size=(30, 4)))
    assert scoring.geometry(spread, spread)["uniformity_image"] < g["uniformity_image"]  # more uniform = lower


def test_clinically_acceptable_needs_the_right_label_and_no_invented_attribute():
    terms = ("white", "dark brown", "light brown", "dots", "globules")
    refs = ["two colours (light brown, dark brown) and dots", "one colour (white) and globules", "no terms here"]
    answers = ["two colours (dark brown) and dots", "one colour (white) and dots", "whatever"]
    assert scoring.attribute_terms("light brown and dark brown", terms) == {"light brown", "dark brown"}
    assert scoring.clinically_acceptable(refs, answers, ["a", "b", "c"], ["a", "b", "x"], terms) == 0.5
    assert scoring.clinically_acceptable(refs, answers, ["a", "b", "c"], ["x", "b", "c"], terms) == 0.0


def test_an_evaluation_set_with_an_unknown_label_is_refused_naming_the_row():
    with pytest.raises(InputError, match="row 1 .*'nevus'"):
        scoring.check_records([{"id": "a", "label": "benign"}, {"id": "b", "label": "nevus"}], LABELS, "test")
    with pytest.raises(InputError, match="empty"):
        scoring.check_records([], LABELS, "site_b")


# ------------------------------------------------------------------------------------- end to end
def test_the_stage_writes_every_metric_predictions_plots_and_an_mlflow_run(params, tmp_path, base_dir, records,
                                                                           monkeypatch):
    from mlflow import MlflowClient

    from conftest import trained_project

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    p = trained_project(params, tmp_path, base_dir, records)
    summary = evaluate.main(p)
    m = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    for key in ("f1_macro", "accuracy", "f1_per_class", "image_reliance", "mismatch_auroc", "retrieval",
                "modality_gap", "bias", "gates"):
        assert key in m, key
    assert set(m["image_reliance"]) >= {"f1_blank_image", "f1_shuffled_image", "ignore_rate", "perceptual_score"}
    assert set(m["retrieval"]) >= {"r@1", "r@5"} and "max_gap" in m["bias"]
    assert all(set(g) >= {"value", "threshold", "passed"} for g in m["gates"].values())
    assert summary["gates_passed"] == all(g["passed"] for g in m["gates"].values())
    preds = [json.loads(line) for line in open(tmp_path / "reports" / "eval" / "predictions.jsonl")]
    assert len(preds) == m["n"] == 8 and {r["id"] for r in preds} == {r["id"] for r in records[32:]}
    assert m["unparseable"]["count"] == sum(r["prediction"] is None for r in preds)
    for png in ("confusion.png", "subgroups.png", "loss.png"):
        assert (tmp_path / "reports" / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    run = MlflowClient(uri).get_run(m["eval_run_id"])
    assert run.data.metrics["f1_macro"] == pytest.approx(m["f1_macro"])
    assert run.data.metrics["image_reliance.ignore_rate"] == pytest.approx(m["image_reliance"]["ignore_rate"])
    assert m["mismatch_auroc"] is not None and m["n_mismatched"] == 4
