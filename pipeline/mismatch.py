"""The secondary image-text model that scores every pair for `curate` (open_clip).

Two modes:
- `model: builtin` with no `pretrained`: a small open_clip CLIP (ResNet image tower, transformer text
  tower) is trained on the dataset itself with K-fold cross-fitting; each pair is scored by the model of
  the fold that held it out, so no pair is scored by a model that saw it.
- a pretrained CLIP (`model: ViT-B-32`, `pretrained: openai` or a checkpoint file; or `builtin` with a
  checkpoint written by `save`): every pair is scored zero-shot.

The score: 1 - cosine is hub-sensitive (some captions are close to every image). We use cross-domain
similarity local scaling (CSLS, Conneau et al. 2018): 2·cos(i, t) - r_img(i) - r_txt(t), where r is
the mean cosine to the k nearest neighbours of the other modality; `mismatch_score` is the negated
CSLS (or 1 - cosine), as a robust z-score (median / MAD) so one threshold fits any dataset.
"""
from __future__ import annotations

import dataclasses
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


def csls(img: torch.Tensor, txt: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Matched-pair cosine and CSLS = 2cos - r_img - r_txt, over the given set; (N,), (N,)."""
    sim = img @ txt.T  # (N, N)
    k = max(1, min(k, len(img) - 1))
    r_img = sim.topk(k, dim=1).values.mean(1)  # image i's k nearest captions
    r_txt = sim.topk(k, dim=0).values.mean(0)  # caption i's k nearest images
    cos = sim.diagonal()
    return cos.numpy(), (2 * cos - r_img - r_txt).numpy()


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


def score_pairs(paths: list[str], captions: list[str], cfg: Mismatch) -> PairScores:
    """Score every (image, caption) pair; cross-fitted unless a pretrained model is configured."""
    n = len(paths)
    cos, cs, fold = np.zeros(n), np.zeros(n), np.full(n, -1)
    if cfg.pretrained:
        model, size = load_pretrained(cfg)
        img, txt = embed(model, load_images(paths, size), _tokenizer(cfg)(captions))
        cos, cs = csls(img, txt, cfg.csls_k)
    else:
        if n < 2 * cfg.folds:
            raise ValueError(f"mismatch scoring needs at least {2 * cfg.folds} pairs, got {n}")
        images, tokens = load_images(paths, cfg.image_size), tokenize(captions)
        fold = fold_ids(n, cfg.folds, cfg.seed)
        for f in range(cfg.folds):
            held = np.flatnonzero(fold == f)
            seen = np.flatnonzero(fold != f)
            model = train_clip(images[seen], tokens[seen], cfg, seed=cfg.seed * 1000 + f)
            img, txt = embed(model, images[held], tokens[held])
            cos[held], cs[held] = csls(img, txt, cfg.csls_k)
    raw = -cs if cfg.score == "csls" else 1 - cos
    return PairScores(cosine=cos, csls=cs, mismatch_score=robust_z(raw), fold=fold)


def cached_scores(paths: list[str], captions: list[str], cfg: Mismatch) -> PairScores:
    """`score_pairs`, cached by content: the key hashes the detector settings, every image's bytes and
    every caption, in order, so a hit is exactly what scoring would compute (the scores are a seeded,
    deterministic function of those). Cache folder: PIPELINE_CACHE (default `.cache`), `mismatch/`."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
    for path, caption in zip(paths, captions):
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
        h.update(hashlib.sha256(caption.encode()).digest())
    cache = Path(os.environ.get("PIPELINE_CACHE", ".cache")) / "mismatch" / f"{h.hexdigest()}.npz"
    if cache.is_file():
        try:
            z = np.load(cache)
            if len(z["fold"]) == len(paths):
                return PairScores(cosine=z["cosine"], csls=z["csls"], mismatch_score=z["mismatch_score"], fold=z["fold"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable: computed again and rewritten
    scores = score_pairs(paths, captions, cfg)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, cosine=scores.cosine, csls=scores.csls, mismatch_score=scores.mismatch_score, fold=scores.fold)
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
