"""promote: a failing gate moves no alias; the first passing model becomes champion; a better one takes
over and the former champion keeps `previous`; rollback restores it — on a real MLflow SQLite registry."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import data as dataio, evaluate, promote, tracking
from pipeline.errors import CheckFailed, InputError

from conftest import ROOT, small_eval, trained_project


@pytest.fixture
def registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def _aliases(c, name):
    out = {}
    for alias in ("champion", "challenger", "previous"):
        v = tracking.alias_version(c, name, alias)
        out[alias] = None if v is None else str(v.version)
    return out


def _with(p, **promote_kw):
    return dataclasses.replace(p, promote=dataclasses.replace(p.promote, **promote_kw))


@pytest.mark.slow
def test_gates_decide_promotion_and_rollback_restores(params, tmp_path, base_dir, records, registry, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = params.mlflow.registered_model
    p1 = trained_project(params, tmp_path / "a", base_dir, records, seed=0)
    # a failing gate: exit 1 listing it, no alias anywhere
    strict = small_eval(p1, min_f1_macro=1.01)
    evaluate.main(strict)
    with pytest.raises(CheckFailed, match="min_f1_macro"):
        promote.main(strict)
    assert _aliases(registry, name) == {"champion": None, "challenger": None, "previous": None}
    # the same adapter with gates that pass: the first champion
    evaluate.main(p1)
    first = promote.main(p1)
    assert first["decision"] == "promoted" and "no champion yet" in first["reasons"][0]
    v1 = first["version"]
    assert _aliases(registry, name) == {"champion": v1, "challenger": v1, "previous": None}
    tags = registry.get_model_version(name, v1).tags
    assert tags["adapter_sha256"] == dataio.dir_sha256(tmp_path / "a" / "models" / "adapter")
    assert tags["git_commit"] and tags["train_run_id"] != "None" and tags["eval_run_id"] != "None"
    # a second adapter that must beat the champion by more than 1.0: kept out, champion unchanged
    p2 = trained_project(params, tmp_path / "b", base_dir, records, seed=1)
    evaluate.main(p2)
    kept = promote.main(_with(p2, min_improvement=1.0))
    assert kept["decision"] == "not promoted" and "does not improve" in kept["reasons"][0]
    v2 = kept["version"]
    assert _aliases(registry, name) == {"champion": v1, "challenger": v2, "previous": None}
    # judged better (no improvement required): it takes over, v1 becomes previous
    taken = promote.main(_with(p2, min_improvement=-1.0))
    assert taken["version"] == v2 and taken["decision"] == "promoted"
    assert _aliases(registry, name) == {"champion": v2, "challenger": v2, "previous": v1}
    # rollback through the command line restores v1; a second rollback has nowhere to go
    env = {**__import__("os").environ}
    r = subprocess.run([sys.executable, "-m", "pipeline", "promote", "--rollback",
                        "--params", str(ROOT / "params.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["champion"] == v1
    assert _aliases(registry, name)["champion"] == v1 and _aliases(registry, name)["previous"] is None
    r = subprocess.run([sys.executable, "-m", "pipeline", "promote", "--rollback",
                        "--params", str(ROOT / "params.yaml")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "previous" in r.stderr


def test_stale_metrics_and_missing_inputs_are_refused(params, tmp_path, base_dir, records, registry):
    p = trained_project(params, tmp_path, base_dir, records)
    with pytest.raises(InputError, match="run evaluate first"):
        promote.main(p)
    evaluate.main(p)
    (tmp_path / "models" / "adapter" / "pipeline_meta.json").write_text(
        (tmp_path / "models" / "adapter" / "pipeline_meta.json").read_text() + "\n")
    with pytest.raises(InputError, match="another adapter"):
        promote.main(p)


def test_an_adapter_for_another_base_is_refused(params, tmp_path, base_dir, records, registry):
    p = trained_project(params, tmp_path, base_dir, records)
    meta = tmp_path / "models" / "adapter" / "pipeline_meta.json"
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "base_weights_sha256": "0" * 64}))
    with pytest.raises(InputError, match=f"trained on base weights {'0' * 64}, but .* holds weights [0-9a-f]{{64}}"):
        evaluate.main(p)
    meta.write_text(json.dumps({**m, "base": "google/gemma-3-4b-it"}))
    with pytest.raises(InputError, match="was trained on base 'google/gemma-3-4b-it'"):
        evaluate.main(p)


@pytest.mark.slow
def test_a_champion_that_cannot_be_evaluated_stops_the_decision(params, tmp_path, base_dir, records, registry,
                                                                  monkeypatch):
    """Never promoted by default: a champion that fails to load (here: its adapter claims other base
    weights) stops promote with exit 1 and moves no alias; only a champion of another `model.base` is
    replaced without a comparison, and the decision says so."""
    from urllib.parse import urlparse

    monkeypatch.chdir(tmp_path)
    name = params.mlflow.registered_model
    p1 = trained_project(params, tmp_path / "a", base_dir, records, seed=0)
    evaluate.main(p1)
    v1 = promote.main(p1)["version"]
    meta = Path(urlparse(registry.get_model_version(name, v1).source).path) / "artifacts/adapter/pipeline_meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_weights_sha256": "0" * 64}))
    p2 = trained_project(params, tmp_path / "b", base_dir, records, seed=1)
    evaluate.main(p2)
    with pytest.raises(CheckFailed, match=f"champion v{v1} could not be evaluated.*base weights {'0' * 64}"):
        promote.main(_with(p2, min_improvement=-1.0))
    assert _aliases(registry, name) == {"champion": v1, "challenger": v1, "previous": None}
    registry.set_model_version_tag(name, v1, "base", "google/gemma-3-4b-it")  # trained on another base
    taken = promote.main(_with(p2, min_improvement=-1.0))
    assert taken["decision"] == "promoted" and "without a comparison" in taken["reasons"][0]
    assert "'google/gemma-3-4b-it'" in taken["reasons"][0]
    assert _aliases(registry, name) == {"champion": taken["version"], "challenger": taken["version"], "previous": v1}


def _sets(**f1):
    return {"sets": {k: {"f1_macro": v, "n": 50} for k, v in f1.items()}}


@pytest.mark.parametrize("new_b, old_a, promoted, phrase", [
    (0.80, 0.84, True, "within the 0.02 tolerance"),          # better on B, A falls 0.01: promoted
    (0.80, 0.82, False, "a_old_test: f1_macro 0.8200 vs champion 0.8500 (drops more than the 0.02 tolerance)"),
    (0.60, 0.85, False, "test: f1_macro 0.6000 vs champion 0.7000 (does not improve)"),
    (0.70, 0.85, False, "does not improve"),                   # equal is not better (min_improvement 0)
])
def test_forgetting_and_improvement_rules(params, new_b, old_a, promoted, phrase):
    """The challenger must improve on `improve_on` (the test split, B's held-out part included) and may
    fall by at most `max_drop` on every other set (A's frozen old test set); the reason names the set and
    both figures."""
    champion = _sets(test=0.70, a_old_test=0.85)
    better, reasons = promote.compare(_sets(test=new_b, a_old_test=old_a), champion, params.promote)
    assert better is promoted
    assert any(phrase in r for r in reasons), reasons
    # without the forgetting rule a drop of 0.03 would pass: the rule is what rejects it
    loose = dataclasses.replace(params.promote, max_drop=1.0)
    assert promote.compare(_sets(test=0.80, a_old_test=0.82), champion, loose)[0] is True


def test_improve_on_a_set_that_does_not_exist_is_refused(params):
    with pytest.raises(InputError, match=r"promote.improve_on: no evaluation set named \['test'\]"):
        promote.compare(_sets(b_heldout=0.9), _sets(b_heldout=0.8), params.promote)


@pytest.mark.slow
def test_after_a_resplit_models_are_compared_only_on_samples_neither_saw(params, tmp_path, base_dir, records,
                                                                          registry, monkeypatch):
    """As after `ingest`: the data is split again and the champion's former training samples land in the
    new test split. promote compares only on the test samples that neither model trained or validated on
    (and says how many); with fewer than promote.min_samples it decides nothing and moves no alias."""
    from pipeline import data as dataio_, split, train

    monkeypatch.chdir(tmp_path)
    name = params.mlflow.registered_model
    p1 = trained_project(params, tmp_path / "a", base_dir, records, seed=0)  # trains on 0-23, validates on 24-31
    evaluate.main(p1)
    v1 = promote.main(p1)["version"]
    seen1 = set(json.loads((tmp_path / "a/models/adapter/seen_ids.json").read_text())["train"])
    assert seen1 == {r["id"] for r in records[:24]}
    assert registry.get_model_version(name, v1).tags["seen_ids_sha256"] == \
        json.loads((tmp_path / "a/models/adapter/pipeline_meta.json").read_text())["seen_ids_sha256"]
    # the re-split: the challenger trains on 12-35 and is tested on 0-11 (seen by the champion) + 36-39
    p2 = small_eval(trained_project(params, tmp_path / "b", base_dir, records[12:36] + records[:12], seed=1))
    sp = tmp_path / "b" / "split"
    tr, va = records[12:36], records[36:40][:2]
    te = records[:12] + records[36:40]
    for n, rows in (("train", tr), ("val", va), ("test", te)):
        dataio_.write_jsonl(sp / f"{n}.jsonl", rows)
    dataio_.write_jsonl(sp / "val_mismatch.jsonl", split.make_val_mismatch(va, tr, 0.5, 0))
    train.run(p2, tr, va)
    evaluate.main(p2)
    unseen = {r["id"] for r in te} - seen1 - {r["id"] for r in tr + va}
    assert len(unseen) == 2 and unseen < {r["id"] for r in records[36:40]}
    taken = promote.main(_with(p2, min_improvement=-1.0, min_samples=2))
    assert any(f"on {len(unseen)} samples neither saw" in r for r in taken["reasons"]), taken["reasons"]
    assert taken["decision"] == "promoted"
    # a third model against that champion, needing more unseen samples than the set holds: no decision
    p3 = small_eval(trained_project(params, tmp_path / "c", base_dir, records, seed=2))
    evaluate.main(p3)
    before = _aliases(registry, name)
    with pytest.raises(CheckFailed, match=r"test: \d+ of 8 samples unseen by both \(promote.min_samples 50\)"):
        promote.main(_with(p3, min_improvement=-1.0, min_samples=50))
    assert _aliases(registry, name) == before


def _standin_registry(c, name, n):
    """`n` registered versions (stand-ins: no model behind them) for the alias bookkeeping rules."""
    c.create_registered_model(name)
    return [str(c.create_model_version(name, source=f"/nowhere/{i}").version) for i in range(n)]


def test_rollback_twice_walks_back_the_champion_history(params, registry):
    name = params.mlflow.registered_model
    v1, v2, v3 = _standin_registry(registry, name, 3)
    for v, prev in ((v1, None), (v2, v1), (v3, v2)):  # three promotions, as take_over records them
        promote.take_over(registry, name, v, None if prev is None else registry.get_model_version(name, prev), ["r"], "promoted")
    assert _aliases(registry, name) == {"champion": v3, "challenger": None, "previous": v2}
    assert promote.main(params, rollback_=True)["champion"] == v2
    assert _aliases(registry, name) == {"champion": v2, "challenger": None, "previous": v1}
    assert promote.main(params, rollback_=True)["champion"] == v1
    assert _aliases(registry, name) == {"champion": v1, "challenger": None, "previous": None}
    with pytest.raises(InputError, match="no version with alias 'previous'"):
        promote.main(params, rollback_=True)
    assert registry.get_model_version(name, v3).tags["decision"] == f"rolled back to v{v2}"


def test_approval_moves_the_alias_only_for_the_champion_it_was_judged_against(params, registry):
    """promote.approval: required leaves a better challenger 'awaiting approval'; --approve moves champion
    unless the champion changed meanwhile (exit 1, nothing moves); --reject tags it, nothing moves."""
    name = params.mlflow.registered_model
    v1, v2, v3 = _standin_registry(registry, name, 3)
    promote.take_over(registry, name, v1, None, ["first"], "promoted")
    for v in (v2, v3):
        registry.set_model_version_tag(name, v, "decision", "awaiting approval: test: f1_macro 0.9 vs 0.8; a: ok")
        registry.set_model_version_tag(name, v, promote.AWAITING_TAG, v1)
    with pytest.raises(InputError, match="version 1 is not awaiting approval"):
        promote.main(params, approve_=v1)
    out = promote.main(params, approve_=v2, by="dr-b")
    assert out["champion"] == v2 and out["reasons"] == ["test: f1_macro 0.9 vs 0.8", "a: ok"]
    assert _aliases(registry, name)["champion"] == v2 and _aliases(registry, name)["previous"] == v1
    tags = registry.get_model_version(name, v2).tags
    assert tags["decision"].startswith("promoted (approved by dr-b): test: f1_macro") and tags["approved_by"] == "dr-b"
    # v3 was judged against v1, but v2 is champion now: approving it would skip a comparison
    with pytest.raises(CheckFailed, match=r"champion changed since version 3 was judged \(then v1, now v2\)"):
        promote.main(params, approve_=v3)
    assert _aliases(registry, name)["champion"] == v2
    out = promote.main(params, reject_=v3, by="dr-c")
    assert out["decision"] == "rejected by a person" and out["champion"] == v2
    assert registry.get_model_version(name, v3).tags["decision"].startswith("rejected by a person (dr-c)")
    assert _aliases(registry, name)["champion"] == v2
    with pytest.raises(InputError, match="at most one of"):
        promote.main(params, rollback_=True, approve_=v3)
