"""The alignment loss against open_clip's ClipLoss, plus the multi-positive case, MSE and the total."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from pipeline import losses


def _pair(b, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


@pytest.mark.parametrize("b", [2, 8, 64])
def test_contrastive_equals_open_clip_clip_loss(b):
    img, txt = _pair(b)
    ours = losses.contrastive(img, txt, tau=0.07)
    ref = ClipLoss()(img, txt, logit_scale=torch.tensor(1 / 0.07, dtype=torch.float64))
    assert abs(float(ours) - float(ref)) < 1e-6


def test_distinct_groups_equal_no_groups():
    img, txt = _pair(8)
    assert torch.allclose(losses.contrastive(img, txt, groups=torch.arange(8)), losses.contrastive(img, txt))


def test_identical_captions_are_positives_of_each_other():
    img, txt = _pair(4, seed=1)
    txt = txt.clone()  # samples 0 and 1 share a caption (their text embeddings may still differ)
    groups = losses.caption_groups(["a", "a", "b", "c"])
    assert groups.tolist() == [0, 0, 1, 2]
    logits = img @ txt.T / 0.07
    targets = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    t2i = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    assert torch.allclose(losses.contrastive(img, txt, groups=groups), (i2t + t2i) / 2)
    assert not torch.allclose(losses.contrastive(img, txt, groups=groups), losses.contrastive(img, txt))


def test_queue_adds_negatives_to_the_image_side_only():
    img, txt = _pair(4, seed=2)
    extra = F.normalize(torch.randn(6, 32, dtype=torch.float64), dim=-1)
    with_q = losses.contrastive(img, txt, extra_text=extra)
    logits = img @ txt.T / 0.07
    i2t = F.cross_entropy(torch.cat([logits, img @ extra.T / 0.07], 1), torch.arange(4))
    t2i = F.cross_entropy(logits.T, torch.arange(4))
    assert torch.allclose(with_q, (i2t + t2i) / 2)


def test_mse_is_summed_over_dimensions_and_pulls_only_the_image():
    img, txt = _pair(8)
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    m = losses.mse(img, txt)
    assert torch.allclose(m, (2 - 2 * (img * txt).sum(1)).mean())
    m.backward()
    assert img.grad is not None and txt.grad is None


def test_weighted_total_and_every_term_reported():
    img, txt = _pair(8)
    ce = torch.tensor(2.0, dtype=torch.float64)
    loss = losses.AlignmentLoss(0.4, 0.5, 0.1).double()
    t = loss(img, txt, ce)
    expect = 0.4 * losses.contrastive(img, txt) + 0.5 * ce + 0.1 * losses.mse(img, txt)
    assert torch.allclose(t.total, expect)
    assert set(t.as_floats()) == {"contrastive", "ce", "mse", "total"}


def test_learnable_temperature_is_clamped_at_ln_100():
    loss = losses.AlignmentLoss(learnable_tau=True)
    assert math.isclose(float(loss.tau), 0.07, rel_tol=1e-5)
    with torch.no_grad():
        loss.log_scale.fill_(10.0)
    assert math.isclose(float(loss.tau), 0.01, rel_tol=1e-5)
    assert loss.log_scale.requires_grad


def test_queue_fills_to_its_size():
    loss = losses.AlignmentLoss(queue_size=5, dim=32).double()
    for s in range(3):
        img, txt = _pair(4, seed=s)
        loss(img, txt, torch.tensor(0.0, dtype=torch.float64))
    assert loss.queue.shape == (5, 32)


def test_a_queued_copy_of_the_rows_own_caption_is_a_positive_not_a_negative():
    # On a few hundred rows the queue soon holds a row's own caption from the epoch before, embedded by
    # the text head of then: as a negative it would push the image away from its own caption. Reference: the same captions put in one batch, where
    # `groups` makes identical captions positives of each other (checked against open_clip above).
    img, txt = _pair(4, seed=3)
    queued = F.normalize(torch.randn(3, 32, dtype=torch.float64), dim=-1)
    queued[1] = F.normalize(txt[2] + 0.3 * queued[1], dim=0)  # row 2's own caption, embedded an epoch ago
    caps, queued_caps = ["a", "b", "c", "d"], ["x", "c", "y"]
    loss = losses.AlignmentLoss(1.0, 0.0, 0.0, queue_size=3, dim=32).double()
    loss.queue, loss.queue_keys = queued, losses.caption_keys(queued_caps)
    got = loss(img, txt, torch.tensor(0.0, dtype=torch.float64), groups=losses.caption_groups(caps),
               keys=losses.caption_keys(caps)).contrastive
    logits = img @ torch.cat([txt, queued]).T / 0.07
    targets = torch.zeros(4, 7, dtype=torch.float64)
    targets[torch.arange(4), torch.arange(4)] = 1
    targets[2, 2], targets[2, 5] = 0.5, 0.5  # row 2: its caption in the batch and in the queue
    i2t = -(targets * logits.log_softmax(1)).sum(1).mean()
    t2i = F.cross_entropy((img @ txt.T / 0.07).T, torch.arange(4))
    assert torch.allclose(got, (i2t + t2i) / 2)
    as_negative = losses.contrastive(img, txt, extra_text=queued)  # the queue without keys: all negatives
    assert not torch.allclose(got, as_negative)
    # the queue remembers the batch's keys in front, in order, cut to its size
    assert loss.queue_keys.tolist() == losses.caption_keys(caps)[:3].tolist()
    assert torch.equal(loss.queue, txt[:3])


def test_caption_keys_are_equal_for_identical_captions_only():
    k = losses.caption_keys(["A dent.", " A dent. ", "A crack."])
    assert k[0] == k[1] and k[0] != k[2] and k.dtype == torch.long
