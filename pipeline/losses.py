"""The three-part alignment loss (docs/design.md §6): contrastive + cross-entropy + MSE, each term returned.

`contrastive` and `mse` are plain functions that outside checks call; `AlignmentLoss` holds the
weights, the optional learnable temperature and the queue of recent text embeddings.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import distributed

MAX_LOG_SCALE = math.log(100.0)  # CLIP's clamp: 1/τ never above 100


def _soft_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with a target distribution per row; (N, M), (N, M) -> scalar."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def contrastive(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    tau: float | torch.Tensor = 0.07,
    groups: torch.Tensor | None = None,
    extra_text: torch.Tensor | None = None,
    extra_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of L2-normalised (B, D) embeddings.

    With all captions distinct it equals open_clip's `ClipLoss` at logit_scale = 1/τ. `groups` (B,):
    equal ids are positives of each other (identical captions are not pushed apart), each row's target
    being uniform over its positives. `extra_text` (Q, D): more captions for the image->text direction,
    negatives unless `extra_pos` (B, Q, bool) marks one as the same caption as row b's: a positive too.
    """
    b = image_emb.shape[0]
    logits = image_emb @ text_emb.T / tau  # (B, B)
    if groups is None:
        pos = torch.eye(b, dtype=logits.dtype, device=logits.device)
    else:
        groups = groups.to(logits.device)
        pos = (groups[:, None] == groups[None, :]).to(logits.dtype)
    targets = pos / pos.sum(1, keepdim=True)
    i2t_logits, i2t_targets = logits, targets
    if extra_text is not None and len(extra_text):
        i2t_logits = torch.cat([logits, image_emb @ extra_text.T / tau], dim=1)  # (B, B + Q)
        if extra_pos is None:
            i2t_targets = F.pad(targets, (0, extra_text.shape[0]))
        else:
            both = torch.cat([pos, extra_pos.to(device=pos.device, dtype=pos.dtype)], dim=1)
            i2t_targets = both / both.sum(1, keepdim=True)
    return 0.5 * (_soft_ce(i2t_logits, i2t_targets) + _soft_ce(logits.T, targets.T))


def mse(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance, summed over D and averaged over B; the text side is the fixed target.

    On unit vectors this is 2 - 2·cos; an element-wise mean would divide it by D and make it inert.
    """
    return ((image_emb - text_emb.detach()) ** 2).sum(-1).mean()


def caption_groups(captions: list[str]) -> torch.Tensor:
    """(B,) ids, equal for identical captions."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c.strip(), len(ids)) for c in captions])


def caption_keys(captions: list[str]) -> torch.Tensor:
    """(B,) int64 keys, equal for identical captions in any batch (a hash): what the queue remembers."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(c.strip().encode(), digest_size=8).digest(), "little",
                                        signed=True) for c in captions], dtype=torch.long)


@dataclass
class Terms:
    contrastive: torch.Tensor
    ce: torch.Tensor
    mse: torch.Tensor
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("contrastive", "ce", "mse", "total")}


class AlignmentLoss(nn.Module):
    """w_con·contrastive + w_ce·cross-entropy + w_mse·MSE, with optional learnable τ and text queue.

    Across processes (`gather`), the contrastive term is computed over the global batch: every rank
    gathers all ranks' embeddings with gradient and `groups` must number the global batch; MSE is each
    rank's share of the global mean (`distributed.mean_share`). In one process both are the plain terms.
    """

    def __init__(self, w_con=0.4, w_ce=0.5, w_mse=0.1, tau=0.07, learnable_tau=False, queue_size=0, dim=0,
                 gather=True):
        super().__init__()
        self.w_con, self.w_ce, self.w_mse, self.gather = w_con, w_ce, w_mse, gather
        log_scale = torch.tensor(math.log(1 / tau))
        self.log_scale = nn.Parameter(log_scale) if learnable_tau else None
        self.register_buffer("fixed_log_scale", log_scale, persistent=False)
        self.queue_size = queue_size
        self.register_buffer("queue", torch.zeros(0, dim), persistent=False)
        self.register_buffer("queue_keys", torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def tau(self) -> torch.Tensor:
        log_scale = self.log_scale if self.log_scale is not None else self.fixed_log_scale
        return 1 / log_scale.clamp(max=MAX_LOG_SCALE).exp()

    def forward(self, image_emb, text_emb, ce: torch.Tensor, groups=None, keys=None) -> Terms:
        """(b, D) unit embeddings of this rank, its cross-entropy share, (B,) caption groups and (B,)
        caption keys (`caption_keys`) of the global batch -> terms.

        With a queue, a queued caption identical to a row's own (its key; on a dataset of a few hundred
        rows the queue soon holds the row's own caption from the epoch before) counts as a positive of
        that row, not as a negative: identical captions are never pushed apart. Without `keys` every
        queued caption is a negative.
        """
        v, t = (distributed.gather(image_emb), distributed.gather(text_emb)) if self.gather else (image_emb, text_emb)
        extra = extra_pos = None
        if self.queue_size:
            extra = self.queue
            keys = None if keys is None else keys.to(self.queue_keys.device)
            if keys is not None and len(self.queue_keys) == len(self.queue):
                extra_pos = keys[:, None] == self.queue_keys[None, :]
        con = contrastive(v, t, self.tau, groups, extra, extra_pos)
        # (b,) squared distances -> this rank's share of the batch mean (= mse() in one process)
        m = distributed.mean_share(((image_emb - text_emb.detach()) ** 2).sum(-1).sum(), image_emb.shape[0])
        if self.queue_size:
            self.queue = torch.cat([t.detach(), self.queue])[: self.queue_size]
            if keys is not None:
                self.queue_keys = torch.cat([keys, self.queue_keys])[: self.queue_size]
        total = self.w_con * con + self.w_ce * ce + self.w_mse * m
        return Terms(contrastive=con, ce=ce, mse=m, total=total)
