"""The secondary image-text model: cross-fitted scores, CSLS, zero-shot loading, and real detection."""
import csv
import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline import curate, mismatch

from conftest import ALL_FAULTS, make_dataset

TINY = dict(folds=3, epochs=2, batch_size=16, image_size=32, embed_dim=32)


def test_no_pair_is_scored_by_a_model_that_saw_it(params, monkeypatch):
    n = 30
    cfg = dataclasses.replace(params.curate.mismatch, **TINY)
    coded = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).clone()
    monkeypatch.setattr(mismatch, "load_images", lambda paths, size: coded)
    seen_by_fold = []
    real_train = mismatch.train_clip

    def spy(images, tokens, cfg_, seed):
        seen_by_fold.append(set(images[:, 0, 0, 0].long().tolist()))  # which pairs this model trains on
        return real_train(images, tokens, dataclasses.replace(cfg_, epochs=1), seed)

    monkeypatch.setattr(mismatch, "train_clip", spy)
    scores = mismatch.score_pairs([f"x{i}" for i in range(n)], [f"caption {i}" for i in range(n)], cfg)
    assert len(seen_by_fold) == cfg.folds
    for f, seen in enumerate(seen_by_fold):
        held = set(np.flatnonzero(scores.fold == f).tolist())
        assert held and not (held & seen) and held | seen == set(range(n))


def test_csls_penalises_hub_captions():
    # caption 0 is close to every image (a hub): plain cosine rates pair 0 well, CSLS does not
    img = torch.nn.functional.normalize(torch.eye(4) + 0.05, dim=1)
    txt = img.clone()
    txt[0] = torch.nn.functional.normalize(torch.ones(4), dim=0)
    cos, cs = mismatch.csls(img, txt, k=2)
    assert np.argmin(cs) == 0
    assert cos[0] > 0.4


def test_robust_z_is_scale_free():
    x = np.random.default_rng(0).normal(size=200)
    assert np.allclose(mismatch.robust_z(x), mismatch.robust_z(10 * x + 3))


def test_builtin_checkpoint_scores_zero_shot(params, clean_set, tmp_path):
    rows = list(csv.DictReader(open(clean_set / "manifest.csv")))
    paths = [str(clean_set / r["image"]) for r in rows]
    caps = [r["caption"] for r in rows]
    cfg = dataclasses.replace(params.curate.mismatch, **TINY)
    model = mismatch.train_clip(mismatch.load_images(paths, 32), mismatch.tokenize(caps), cfg, seed=0)
    mismatch.save(model, tmp_path / "clip.pt")
    scores = mismatch.score_pairs(paths, caps, dataclasses.replace(cfg, pretrained=str(tmp_path / "clip.pt")))
    img, txt = mismatch.embed(model, mismatch.load_images(paths, 32), mismatch.tokenize(caps))
    assert (scores.fold == -1).all()
    assert np.allclose(scores.cosine, (img * txt).sum(1).numpy(), atol=1e-5)


@pytest.mark.slow
def test_detector_flags_swapped_captions_through_curate(params, tmp_path):
    """End to end through curate on a set whose signal is quick to learn (colour words): the swapped
    pairs score highest and are quarantined as likely_mismatch. (Quality on the lesion benchmark is
    measured by bench/mismatch.py, not here.)"""
    from PIL import Image

    colours = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 200), "yellow": (230, 210, 40),
               "black": (20, 20, 20), "white": (240, 240, 240)}
    names = list(colours)
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    rows, swapped = [], set()
    for i in range(150):
        c = names[i % len(names)]
        arr = np.clip(np.array(colours[c]) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / "images" / f"{i}.png")
        said = c
        if i % 10 == 3:  # 10 % of captions name another colour
            said = names[(names.index(c) + 3) % len(names)]
            swapped.add(str(i))
        rows.append({"id": str(i), "image": f"images/{i}.png", "caption": f"A square of plain {said} colour."})
    cfg = dataclasses.replace(params.curate, min_words=1, min_side=8, near_duplicate_bits=-1, visual_terms=("colour",),
                              mismatch=dataclasses.replace(params.curate.mismatch, **{**TINY, "epochs": 15},
                                                           threshold=2.5, shift=0.0))
    result = curate.run(rows, tmp_path, cfg, params.data)
    scored = result.accepted + result.quarantined
    y = [r["id"] in swapped for r in scored]
    s = [r["quality"]["mismatch_score"] for r in scored]
    assert roc_auc_score(y, s) >= 0.9
    flagged = {q["id"] for q in result.quarantined if "likely_mismatch" in q["reasons"]}
    assert len(flagged & swapped) >= 0.6 * len(swapped) and len(flagged - swapped) <= 3
    assert result.report["mismatch"]["scored"] == 150


def test_each_source_is_scored_alone_and_unchanged_sources_come_from_the_cache(params, clean_set, tmp_path,
                                                                               monkeypatch):
    """After `ingest`, curate scores the raw dataset and every batch with detectors of their own; the raw
    dataset's scores come from the content-keyed cache (no retraining); a changed caption misses it."""
    from pipeline import data as dataio

    calls = []

    def fake(paths, captions, cfg):
        calls.append(len(paths))
        n = len(paths)
        return mismatch.PairScores(cosine=np.zeros(n), csls=np.zeros(n), mismatch_score=np.linspace(-1, 1, n),
                                   fold=np.zeros(n, int))

    monkeypatch.setattr(mismatch, "score_pairs", fake)
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    cfg = dataclasses.replace(params.curate, mismatch=dataclasses.replace(params.curate.mismatch, folds=2))
    batches = tmp_path / "batches"
    make_dataset(batches / "b1", params, n=12, image_size=64, seed=8, site="b1",
                 faults={k: 0.0 for k in ALL_FAULTS})
    rows = dataio.read_manifest(clean_set / "manifest.csv")
    result = curate.run(curate.read_rows(clean_set), clean_set, cfg, params.data)
    assert calls == [len(rows)] and set(result.report["mismatch"]["sources"]) == {"raw"}
    calls.clear()
    result = curate.run(curate.read_rows(clean_set, batches), clean_set, cfg, params.data)
    assert calls == [12]  # only the new batch is scored; the raw dataset's scores are a cache hit
    assert result.report["mismatch"]["sources"]["b1"]["scored"] == 12
    assert result.report["mismatch"]["scored"] == len(rows) + 12
    calls.clear()
    changed = curate.read_rows(clean_set)
    changed[0]["caption"] = changed[0]["caption"].replace("This lesion", "The lesion")
    curate.run(changed, clean_set, cfg, params.data)
    assert calls == [len(rows)]  # another caption: another key
