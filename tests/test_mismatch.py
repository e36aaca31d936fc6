"""The secondary image-text model: cross-fitted scores, CSLS, the decision rule, zero-shot loading, real
detection, and the image checks' worker processes."""
import csv
import dataclasses

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pipeline import curate, mismatch

from conftest import ALL_FAULTS, make_dataset

TINY = dict(model="builtin", folds=3, epochs=2, batch_size=16, image_size=32, embed_dim=32)


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


def _colour_squares(folder, n=150, swap_every=None):
    """Plain colour squares captioned by their colour; with `swap_every`, every such row names another."""
    from PIL import Image

    colours = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (40, 60, 200), "yellow": (230, 210, 40),
               "black": (20, 20, 20), "white": (240, 240, 240)}
    names = list(colours)
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    rows, swapped = [], set()
    for i in range(n):
        c = names[i % len(names)]
        arr = np.clip(np.array(colours[c]) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / "images" / f"{i}.png")
        said = c
        if swap_every and i % swap_every == 3:
            said = names[(names.index(c) + 3) % len(names)]
            swapped.add(str(i))
        rows.append({"id": str(i), "image": f"images/{i}.png", "caption": f"A square of plain {said} colour."})
    return rows, swapped


def _squares_cfg(params, **mm):
    return dataclasses.replace(params.curate, min_words=1, min_side=8, near_duplicate_bits=-1, visual_terms=("colour",),
                               mismatch=dataclasses.replace(params.curate.mismatch, **mm))


def test_detector_flags_swapped_captions_and_nothing_on_clean_data(params, tmp_path):
    """The committed detector (frozen features, cross-fitted heads, the `preferred` rule) end to end
    through curate: swapped captions score highest and are quarantined; on the same kind of data without a
    swap nothing is (a z-score cut would flag its tail whatever the data). One-word captions of six
    colours: a swapped caption is out-ranked by about one colour's captions (a sixth), so the rule's share
    is set for such captions (README, *curate*: short, label-like captions)."""
    rows, swapped = _colour_squares(tmp_path / "noisy", swap_every=10)
    cfg = _squares_cfg(params, margin=1.0, max_preferred=0.05)
    assert cfg.mismatch.model == "features" and cfg.mismatch.rule == "preferred"
    result = curate.run(rows, tmp_path / "noisy", cfg, params.data)
    scored = result.accepted + result.quarantined
    y = [r["id"] in swapped for r in scored]
    assert roc_auc_score(y, [r["quality"]["mismatch_score"] for r in scored]) >= 0.9
    assert roc_auc_score(y, [r["quality"]["mismatch_preferred"] for r in scored]) >= 0.9
    flagged = {q["id"] for q in result.quarantined if "likely_mismatch" in q["reasons"]}
    assert len(flagged & swapped) >= 0.8 * len(swapped) and len(flagged - swapped) <= 2
    assert result.report["mismatch"]["scored"] == 150 and result.report["mismatch"]["rule"] == "preferred"

    rows, _ = _colour_squares(tmp_path / "clean")
    result = curate.run(rows, tmp_path / "clean", cfg, params.data)
    assert not [q for q in result.quarantined if "likely_mismatch" in q["reasons"]]


def test_the_rules_flags(params):
    """`preferred` reads the share, `zscore` the tail of the scores (flagged whatever the data holds),
    `top_fraction` a fixed share; on scores of pairs that no other caption beats, only the tail rule flags."""
    n = 1000
    z = np.random.default_rng(0).normal(size=n)
    s = mismatch.PairScores(cosine=np.zeros(n), csls=np.zeros(n), mismatch_score=z, fold=np.zeros(n, int),
                            preferred=np.zeros(n))
    cfg = params.curate.mismatch
    assert not s.flags(cfg).any()
    assert s.flags(dataclasses.replace(cfg, rule="zscore", threshold=2.0)).sum() == (z > 2.0).sum() > 0
    assert s.flags(dataclasses.replace(cfg, top_fraction=0.05)).sum() == 50
    s.preferred[:7] = cfg.max_preferred + 0.01
    assert np.flatnonzero(s.flags(cfg)).tolist() == list(range(7))


def test_no_pair_is_scored_by_heads_that_saw_it(params, monkeypatch):
    n = 60
    x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    x[:, 0] = np.arange(n)  # column 0 names the pair (before standardisation: kept in order)
    seen_by_fit = []
    real_fit = mismatch.fit_heads

    def spy(xs, ts, cfg_, seed):
        z0 = (x[:, 0] - x[:, 0].mean()) / (x[:, 0].std() + 1e-6)  # column 0 as score_features standardises it
        seen_by_fit.append({int(np.abs(z0 - v).argmin()) for v in xs[:, 0]})
        return real_fit(xs, ts, dataclasses.replace(cfg_, head_max_steps=2), seed)

    monkeypatch.setattr(mismatch, "fit_heads", spy)
    cfg = dataclasses.replace(params.curate.mismatch, folds=3)
    scores = mismatch.score_features(x, [f"caption number {i} of {i % 5}" for i in range(n)], cfg)
    assert len(seen_by_fit) == 2 * cfg.folds  # two passes (refit)
    for k, seen in enumerate(seen_by_fit):
        held = set(np.flatnonzero(scores.fold == k % cfg.folds).tolist())
        assert held and not (held & seen)


def test_preferred_share_and_csls_blockwise_equal_a_direct_count():
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(50, 8, generator=gen), dim=1)
    lg = 10 * img @ txt.T
    d = lg.diagonal()
    direct = (((lg > d[:, None] + 1).sum(1) + (lg > d[None, :] + 1).sum(0)) / (2 * 49)).numpy()
    assert np.allclose(mismatch.preferred_share(img, txt, 10.0, 1.0, block=7), direct)
    sim = img @ txt.T
    full = (2 * sim.diagonal() - sim.topk(5, 1).values.mean(1) - sim.topk(5, 0).values.mean(0)).numpy()
    assert np.allclose(mismatch.csls(img, txt, 5, block=7)[1], full, atol=1e-6)


def test_features_are_fixed_and_generic(clean_set):
    from PIL import Image

    path = next((clean_set / "images").iterdir())
    a = mismatch.image_features(Image.open(path))
    assert a.shape == (2 * mismatch.COLOUR_BINS ** 3 + 4 * mismatch.N_FILTERS,) and np.isfinite(a).all()
    assert np.array_equal(a, mismatch.image_features(Image.open(path)))  # nothing learnt, nothing random
    red = Image.new("RGB", (64, 64), (200, 30, 30))
    blue = Image.new("RGB", (64, 64), (40, 60, 200))
    assert not np.allclose(mismatch.image_features(red), mismatch.image_features(blue))


def test_a_worker_that_dies_on_an_image_costs_that_row_only(params, clean_set, monkeypatch):
    """A decoder crash (the process dies, no exception) quarantines its row as unreadable_image; every
    other row is checked as usual, and the result equals a run in one process."""
    import os

    from pipeline import checks, data as dataio

    rows = dataio.read_manifest(clean_set / "manifest.csv")
    victim = rows[17]["image"].split("/")[-1]
    real_decode = checks._decode

    def decode(row, path, cfg):
        if path.name == victim:
            os._exit(11)  # what a segfault in a decoder looks like to the parent
        return real_decode(row, path, cfg)

    cfg = dataclasses.replace(params.curate, mismatch=dataclasses.replace(params.curate.mismatch, enabled=False))
    one = curate.run(rows, clean_set, dataclasses.replace(cfg, workers=1), params.data)
    monkeypatch.setattr(checks, "_decode", decode)
    monkeypatch.setattr(checks, "CHUNK", 4)
    crashed = curate.run(rows, clean_set, dataclasses.replace(cfg, workers=2), params.data)
    assert [q["id"] for q in crashed.quarantined] == [rows[17]["id"]]
    assert crashed.quarantined[0]["reasons"] == ["unreadable_image"]
    assert [a for a in crashed.accepted] == [a for a in one.accepted if a["id"] != rows[17]["id"]]


def test_each_source_is_scored_alone_and_unchanged_sources_come_from_the_cache(params, clean_set, tmp_path,
                                                                               monkeypatch):
    """After `ingest`, curate scores the raw dataset and every batch with detectors of their own; the raw
    dataset's scores come from the content-keyed cache (no retraining); a changed caption misses it."""
    from pipeline import data as dataio

    calls = []

    def fake(paths, captions, cfg, features=None):
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
