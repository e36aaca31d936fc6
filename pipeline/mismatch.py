"""The secondary image-text model that scores every pair for `curate`.

Three modes:
- `model: features` (default): every image is described once by frozen, generic features computed while
  it is checked (colour histograms of the whole image and of its centre, rectified responses of fixed
  random filters at two scales: nothing is learnt from the data), every caption by TF-IDF over words and
  word pairs; light heads (an MLP on the image side, a linear map on the text side) are fitted with the
  contrastive loss, K-fold cross-fitted: each pair is scored by the heads of the fold that held it out. A
  second pass refits the heads without the pairs the first pass flagged (`refit`). Seconds per thousand
  pairs, linear in their number.
- `model: builtin` with no `pretrained`: a small open_clip CLIP (ResNet image tower, transformer text
  tower) is trained on the dataset itself with K-fold cross-fitting; each pair is scored by the model of
  the fold that held it out, so no pair is scored by a model that saw it (slow: kept for comparison).
- a pretrained CLIP (`model: ViT-B-32`, `pretrained: openai` or a checkpoint file; or `builtin` with a
  checkpoint written by `save`): every pair is scored zero-shot.

The score: 1 - cosine is hub-sensitive (some captions are close to every image). We use cross-domain
similarity local scaling (CSLS, Conneau et al. 2018): 2·cos(i, t) - r_img(i) - r_txt(t), where r is
the mean cosine to the k nearest neighbours of the other modality; `mismatch_score` is the negated
CSLS (or 1 - cosine), as a robust z-score (median / MAD).

The decision (`rule: preferred`): a pair is flagged when the model that held it out prefers more than
`max_preferred` of the other held-out captions over the given one by at least `margin` logits (and as many
of the other images over the given image; the two shares averaged). A caption swapped in from another pair
is, from its image's side, a caption drawn at random: it is out-ranked by a share of the others spread
over (0, 1); a correct caption is out-ranked by few. So the rule flags the pairs that look like random
pairs, and on data without mismatches flags almost nothing, whereas a z-score cut (`rule: zscore`,
`threshold`) always flags the tail of the scores.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import Mismatch

MEAN = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
STD = torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1)


@dataclass
class PairScores:
    """Per pair, in input order."""

    cosine: np.ndarray  # (N,)
    csls: np.ndarray  # (N,)
    mismatch_score: np.ndarray  # (N,) robust z of the chosen score: higher = more likely mismatched
    fold: np.ndarray  # (N,) fold that held the pair out (-1: zero-shot)
    preferred: np.ndarray | None = None  # (N,) share of the other captions / images preferred by `margin`

    def flags(self, cfg: Mismatch) -> np.ndarray:
        """(N,) bool: the committed decision (`top_fraction`, else `rule`)."""
        if cfg.top_fraction is not None:
            flag = np.zeros(len(self.mismatch_score), bool)
            flag[np.argsort(-self.mismatch_score, kind="stable")[: int(round(cfg.top_fraction * len(flag)))]] = True
            return flag
        if cfg.rule == "preferred" and self.preferred is not None:
            return self.preferred > cfg.max_preferred
        return self.mismatch_score > cfg.threshold


def builtin_model(cfg: Mismatch):
    """A small open_clip CLIP: ModifiedResNet image tower, 2-layer text transformer."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, head_width=32, image_size=cfg.image_size)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    return CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """(N, 3, size, size) normalised pixels."""
    arr = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    return (x - MEAN) / STD


def tokenize(captions: list[str]) -> torch.Tensor:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=77)(captions)


def _augment(x: torch.Tensor, gen: torch.Generator, shift: float = 0.0, rotate_flip: bool = True) -> torch.Tensor:
    """Random shifts, and random 90° rotations and flips (per batch) when `rotate_flip`: only for data
    whose captions never name a side or an orientation (`curate.mismatch.rotate_flip`)."""
    if rotate_flip:
        k = int(torch.randint(0, 4, (1,), generator=gen))
        x = torch.rot90(x, k, dims=(2, 3))
        if bool(torch.randint(0, 2, (1,), generator=gen)):
            x = torch.flip(x, dims=(3,))
    pad = int(shift * x.shape[-1])
    if pad:
        size = x.shape[-1]
        i, j = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")[..., i : i + size, j : j + size]
    return x


def train_clip(images: torch.Tensor, tokens: torch.Tensor, cfg: Mismatch, seed: int):
    """Fit a builtin CLIP on (images, tokens) with open_clip's own contrastive loss."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(seed)
    model = builtin_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(images) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    loss_fn, gen = ClipLoss(), torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(images), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            img_f, txt_f, scale = model(_augment(images[idx], gen, cfg.shift, cfg.rotate_flip), tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100))
    return model.eval()


@torch.no_grad()
def embed(model, images: torch.Tensor, tokens: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (N, D) image and text embeddings."""
    model.eval()
    img = torch.cat([_encode_tta(model, images[i : i + batch]) for i in range(0, len(images), batch)])
    txt = torch.cat([model.encode_text(tokens[i : i + batch], normalize=True) for i in range(0, len(tokens), batch)])
    return img, txt


def _encode_tta(model, x: torch.Tensor) -> torch.Tensor:
    """Mean embedding over the 8 rotations and flips (attributes are orientation-free), (B, D)."""
    views = [torch.rot90(v, k, dims=(2, 3)) for v in (x, torch.flip(x, dims=(3,))) for k in range(4)]
    return F.normalize(torch.stack([model.encode_image(v, normalize=True) for v in views]).mean(0), dim=-1)


def pair_statistics(img: torch.Tensor, txt: torch.Tensor, k: int, scale: float, margin: float,
                    block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One blockwise pass over the (N, N) similarities (memory O(block * N)): each pair's cosine, its CSLS
    = 2cos - r_img - r_txt (r: mean cosine of the k nearest of the other modality), and its preferred share:
    the mean of the share of the other captions that image i prefers over its own by more than `margin`
    logits (cosine x `scale`) and the share of the other images that caption i prefers over its image."""
    n = len(img)
    k = max(1, min(k, n - 1))
    cos = (img * txt).sum(1)
    diag = scale * cos
    r_img, by_img, by_txt = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    top_txt = torch.full((k, n), -float("inf"))  # running top-k over image blocks, per caption
    for a in range(0, n, block):
        sim = img[a : a + block] @ txt.T  # (B, N): images a.. against every caption
        r_img[a : a + block] = sim.topk(k, dim=1).values.mean(1)  # image i's k nearest captions
        top_txt = torch.cat([top_txt, sim]).topk(k, dim=0).values
        lg = scale * sim
        by_img[a : a + block] = (lg > diag[a : a + block, None] + margin).sum(1).float()
        by_txt += (lg > diag[None, :] + margin).sum(0).float()  # caption j: images a.. preferred over its own
    r_txt = top_txt.mean(0)  # caption i's k nearest images
    pref = (by_img + by_txt) / (2 * max(n - 1, 1))
    return cos.numpy(), (2 * cos - r_img - r_txt).numpy(), pref.numpy()


def csls(img: torch.Tensor, txt: torch.Tensor, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Matched-pair cosine and CSLS over the given set; (N,), (N,) (`pair_statistics`)."""
    cos, cs, _ = pair_statistics(img, txt, k, 1.0, 0.0, block)
    return cos, cs


def robust_z(x: np.ndarray) -> np.ndarray:
    med = np.median(x)
    mad = np.median(np.abs(x - med)) * 1.4826
    return (x - med) / max(mad, 1e-6)


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """Shuffled K-fold assignment, (N,) in [0, folds)."""
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, int)
    out[perm] = np.arange(n) % folds
    return out


def score_pairs(paths: list[str], captions: list[str], cfg: Mismatch, features: np.ndarray | None = None) -> PairScores:
    """Score every (image, caption) pair; cross-fitted unless a pretrained model is configured.
    `model: features` uses the images' `image_features` (computed here from `paths` when not given)."""
    n = len(paths)
    cos, cs, fold = np.zeros(n), np.zeros(n), np.full(n, -1)
    if cfg.model == "features" and not cfg.pretrained:
        if features is None:
            features = np.stack([_features_of(p, cfg.feature_size) for p in paths])
        return score_features(features, captions, cfg)
    if cfg.pretrained:
        model, size = load_pretrained(cfg)
        img, txt = embed(model, load_images(paths, size), _tokenizer(cfg)(captions))
        cos, cs, pref = pair_statistics(img, txt, cfg.csls_k, float(model.logit_scale.detach().exp()), cfg.margin)
    else:
        _check_size(n, cfg)
        images, tokens = load_images(paths, cfg.image_size), tokenize(captions)
        fold = fold_ids(n, cfg.folds, cfg.seed)
        pref = np.zeros(n)
        for f in range(cfg.folds):
            held = np.flatnonzero(fold == f)
            seen = np.flatnonzero(fold != f)
            model = train_clip(images[seen], tokens[seen], cfg, seed=cfg.seed * 1000 + f)
            img, txt = embed(model, images[held], tokens[held])
            cos[held], cs[held], pref[held] = pair_statistics(img, txt, cfg.csls_k, float(model.logit_scale.detach().exp()),
                                                              cfg.margin)
    raw = -cs if cfg.score == "csls" else 1 - cos
    return PairScores(cosine=cos, csls=cs, mismatch_score=robust_z(raw), fold=fold, preferred=pref)


def _check_size(n: int, cfg: Mismatch) -> None:
    if n < 2 * cfg.folds:
        raise ValueError(f"mismatch scoring needs at least {2 * cfg.folds} pairs, got {n}")


# ------------------------------------------------------------------------------ model: features
COLOUR_BINS = 6  # per channel: 6^3 = 216-bin colour histograms
N_FILTERS = 96


@functools.cache
def _filters() -> np.ndarray:
    """(75, N_FILTERS) fixed random 5x5x3 filters, zero-mean, unit norm (seeded: the same in every process)."""
    w = np.random.default_rng(20240601).normal(size=(75, N_FILTERS)).astype(np.float32)
    w -= w.mean(0)
    return w / np.linalg.norm(w, axis=0)


def _features_of(path: str, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return image_features(img, size)


def image_features(img: Image.Image, size: int = 64) -> np.ndarray:
    """Frozen generic features of one image, (2 * 216 + 4 * N_FILTERS,) float32: square-rooted colour
    histograms (6 bins a channel) of the whole image and of its central half, then the mean and the max of
    the rectified responses of fixed random 5x5 filters at full and half resolution. Pure numpy: safe in
    forked worker processes."""
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    q = np.minimum((arr * COLOUR_BINS).astype(np.int64), COLOUR_BINS - 1)
    code = (q[..., 0] * COLOUR_BINS + q[..., 1]) * COLOUR_BINS + q[..., 2]
    c = size // 4
    bins = COLOUR_BINS ** 3
    parts = [np.sqrt(np.bincount(x.ravel(), minlength=bins) / x.size) for x in (code, code[c:-c, c:-c])]
    w = _filters()
    for x in (arr, arr.reshape(size // 2, 2, size // 2, 2, 3).mean((1, 3))):
        patches = np.lib.stride_tricks.sliding_window_view(x, (5, 5), axis=(0, 1))  # (H-4, W-4, 3, 5, 5)
        r = np.abs(patches.transpose(0, 1, 3, 4, 2).reshape(-1, 75) @ w)  # (positions, N_FILTERS)
        parts += [r.mean(0), r.max(0)]
    return np.concatenate(parts).astype(np.float32)


def text_features(captions: list[str], max_features: int):
    """(N, V) sparse CSR TF-IDF of words and word pairs (sublinear counts, l2 rows), fitted on these
    captions (unsupervised: no pairing is used). Kept sparse: made dense a batch at a time."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2 if len(captions) >= 50 else 1,
                          max_features=max_features, dtype=np.float32)
    try:
        return vec.fit_transform(captions).tocsr()
    except ValueError:  # no term occurs twice: every caption its own words
        return TfidfVectorizer(ngram_range=(1, 1), dtype=np.float32).fit_transform(captions).tocsr()


def _dense(t, idx) -> torch.Tensor:
    return torch.from_numpy(np.asarray(t[idx].toarray(), np.float32))


class Heads(torch.nn.Module):
    """Light heads on cached features: image MLP, text linear map, learnt temperature."""

    def __init__(self, d_img: int, d_txt: int, cfg: Mismatch):
        super().__init__()
        self.img = torch.nn.Sequential(torch.nn.Linear(d_img, cfg.head_hidden), torch.nn.GELU(),
                                       torch.nn.Dropout(0.1), torch.nn.Linear(cfg.head_hidden, cfg.embed_dim))
        self.txt = torch.nn.Linear(d_txt, cfg.embed_dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1)

    def scale(self) -> float:
        return float(self.logit_scale.detach().exp().clamp(max=100))


def fit_heads(x: np.ndarray, t, cfg: Mismatch, seed: int) -> Heads:
    """Fit `Heads` on (x, t) pairs (t: sparse rows) with open_clip's contrastive loss; at most
    `head_max_steps` steps."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(seed)
    heads = Heads(x.shape[1], t.shape[1], cfg)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.head_lr, weight_decay=1e-2)
    xs = torch.from_numpy(x)
    bs = max(2, min(cfg.head_batch_size, len(xs)))
    per_epoch = max(1, len(xs) // bs)
    steps = min(cfg.head_epochs * per_epoch, cfg.head_max_steps)
    gen, loss_fn = torch.Generator().manual_seed(seed), ClipLoss()
    heads.train()
    perm, k = torch.randperm(len(xs), generator=gen), 0
    for _ in range(steps):
        if k + bs > len(xs):
            perm, k = torch.randperm(len(xs), generator=gen), 0
        idx = perm[k : k + bs]
        k += bs
        a, b = heads(xs[idx], _dense(t, idx.numpy()))
        loss = loss_fn(a, b, heads.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return heads.eval()


def score_features(x: np.ndarray, captions: list[str], cfg: Mismatch) -> PairScores:
    """Cross-fitted scores from cached image features `x` (N, D) and the captions (see the module doc)."""
    n = len(x)
    _check_size(n, cfg)
    x = np.asarray(x, np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    t = text_features(captions, cfg.text_features)
    fold = fold_ids(n, cfg.folds, cfg.seed)
    train_on = np.ones(n, bool)
    for p in range(2 if cfg.refit else 1):
        cos, cs, pref = np.zeros(n), np.zeros(n), np.zeros(n)
        for f in range(cfg.folds):
            held, seen = np.flatnonzero(fold == f), np.flatnonzero((fold != f) & train_on)
            heads = fit_heads(x[seen], t[seen], cfg, seed=cfg.seed * 1000 + 100 * p + f)
            with torch.no_grad():
                parts = [heads(torch.from_numpy(x[b]), _dense(t, b)) for b in np.array_split(held, -(-len(held) // 4096))]
            img, txt = torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])
            cos[held], cs[held], pref[held] = pair_statistics(img, txt, cfg.csls_k, heads.scale(), cfg.margin)
        raw = -cs if cfg.score == "csls" else 1 - cos
        scores = PairScores(cosine=cos, csls=cs, mismatch_score=robust_z(raw), fold=fold, preferred=pref)
        train_on = ~scores.flags(cfg)
    return scores


def preferred_share(img: torch.Tensor, txt: torch.Tensor, scale: float, margin: float, block: int = 2048) -> np.ndarray:
    """(N,) each pair's preferred share (`pair_statistics`)."""
    return pair_statistics(img, txt, 1, scale, margin, block)[2]


def cached_scores(paths: list[str], captions: list[str], cfg: Mismatch, digests: list[str] | None = None,
                  features: np.ndarray | None = None) -> PairScores:
    """`score_pairs`, cached by content: the key hashes the detector settings, every image's bytes
    (`digests`: their sha256, when already known) and every caption, in order, so a hit is exactly what
    scoring would compute (the scores are a seeded, deterministic function of those). Cache folder:
    PIPELINE_CACHE (default `.cache`), `mismatch/`."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode() + b"|v2")
    for i, (path, caption) in enumerate(zip(paths, captions)):
        h.update(bytes.fromhex(digests[i]) if digests else hashlib.sha256(Path(path).read_bytes()).digest())
        h.update(hashlib.sha256(caption.encode()).digest())
    cache = Path(os.environ.get("PIPELINE_CACHE", ".cache")) / "mismatch" / f"{h.hexdigest()}.npz"
    if cache.is_file():
        try:
            z = np.load(cache)
            if len(z["fold"]) == len(paths):
                return PairScores(cosine=z["cosine"], csls=z["csls"], mismatch_score=z["mismatch_score"], fold=z["fold"],
                                  preferred=z["preferred"] if "preferred" in z and z["preferred"].size else None)
        except (OSError, ValueError, KeyError):
            pass  # unreadable: computed again and rewritten
    scores = score_pairs(paths, captions, cfg, features=features)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, cosine=scores.cosine, csls=scores.csls, mismatch_score=scores.mismatch_score, fold=scores.fold,
                 preferred=scores.preferred if scores.preferred is not None else np.zeros(0))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only cache folder only costs the re-computation
    return scores


def save(model, path: Path) -> None:
    torch.save(model.state_dict(), path)


def load_pretrained(cfg: Mismatch):
    """A pretrained open_clip model and its input size: `builtin` + checkpoint, or any open_clip name."""
    if cfg.model == "builtin":
        model = builtin_model(cfg)
        model.load_state_dict(torch.load(cfg.pretrained, map_location="cpu", weights_only=True))
        return model.eval(), cfg.image_size
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(cfg.model, pretrained=cfg.pretrained)
    return model.eval(), model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size


def _tokenizer(cfg: Mismatch):
    if cfg.model == "builtin":
        return tokenize
    import open_clip

    return open_clip.get_tokenizer(cfg.model)
