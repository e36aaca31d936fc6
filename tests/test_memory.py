"""The memory levers of `train` (README, *train*): each changes what is kept in memory, never the result.

- `train.ce_chunk`: fused linear cross-entropy gives the same loss and gradients as the one-pass loss,
  and no tensor of (answer tokens x vocabulary) logits is kept for the backward pass;
- `train.grad_checkpointing: vision | text | true`: the chosen tower recomputes its activations, with
  the same gradients;
- `train.optimizer: adamw8bit`: moments stored in 8 bits, and they survive a checkpoint round trip.
"""
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from pipeline import model as modelmod, optim, train
from pipeline.errors import InputError

from conftest import with_base


class _Head(torch.nn.Module):
    def __init__(self, hidden, vocab, cap):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        text = SimpleNamespace(final_logit_softcapping=cap)
        self.config = SimpleNamespace(get_text_config=lambda: text)


def _case(cap, seed=0, B=3, T=40, H=16, V=5000):
    g = torch.Generator().manual_seed(seed)
    base = _Head(H, V, cap)
    with torch.no_grad():
        base.lm_head.weight.copy_(torch.randn(V, H, generator=g) * 0.3)
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :25] = -100  # the prompt
    labels[1, 30:] = -100  # padding
    return base, hidden, labels


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_cross_entropy_equals_the_one_pass_loss_and_gradients(cap, chunk):
    base, hidden, labels = _case(cap)
    full = modelmod.answer_ce(base, hidden, labels)
    g_h, g_w = torch.autograd.grad(full, [hidden, base.lm_head.weight])
    part = modelmod.answer_ce(base, hidden, labels, chunk=chunk)
    c_h, c_w = torch.autograd.grad(part, [hidden, base.lm_head.weight])
    # the reference: PyTorch's cross-entropy over the full (B, T, V) logits, answer positions only
    logits = base.lm_head(hidden[:, :-1])
    if cap:
        logits = torch.tanh(logits / cap) * cap
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert torch.allclose(full, ref, atol=1e-5) and torch.allclose(part, ref, atol=1e-5)
    assert torch.allclose(c_h, g_h, atol=1e-6) and torch.allclose(c_w, g_w, atol=1e-6)


def _saved_logits(fn, vocab: int) -> int:
    """How many logit values (tensors whose last dimension is the vocabulary) autograd keeps for the
    backward pass of `fn`'s loss."""
    sizes = [0]

    def pack(t):
        if t.dim() and t.shape[-1] == vocab:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(sizes)


def test_chunked_cross_entropy_never_keeps_the_answer_logits():
    base, hidden, labels = _case(None)
    n_answer = int((labels[:, 1:] != -100).sum())
    vocab = base.lm_head.out_features
    one_pass = _saved_logits(lambda: modelmod.answer_ce(base, hidden, labels), vocab)
    chunked = _saved_logits(lambda: modelmod.answer_ce(base, hidden, labels, chunk=8), vocab)
    assert one_pass >= n_answer * vocab  # the one-pass loss keeps (N, V) logits: the test can fail
    assert chunked == 0  # each chunk's logits are recomputed in the backward pass, one chunk at a time


def _grads(p, records, which):
    """Gradients of the trainable parameters after one step's loss, with `which` towers checkpointed."""
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, grad_checkpointing=which,
                                                         peft=dataclasses.replace(p.train.peft, dropout=0.0)))
    state = train.setup(p, records[:8], [])
    base = modelmod.backbone(state.model)
    on = {"vision": base.model.vision_tower.is_activation_checkpointing,
          "text": base.model.language_model.is_activation_checkpointing}
    batch = modelmod.to_device(state.collator(records[:4]), state.device)
    terms = train.forward_terms(state.model, state.heads, state.loss_fn, batch, text_grad=False, anchor=state.anchor)
    terms.total.backward()
    return on, {n: q.grad.clone() for n, q in state.model.named_parameters() if q.grad is not None}


def test_checkpointing_each_tower_keeps_the_gradients(params, tmp_path, base_dir, records):
    p = with_base(params, tmp_path, base_dir)
    off, ref = _grads(p, records, False)
    assert off == {"vision": False, "text": False}
    for which, expect in (("vision", {"vision": True, "text": False}), ("text", {"vision": False, "text": True}),
                          (True, {"vision": True, "text": True})):
        on, got = _grads(p, records, which)
        assert on == expect, which
        assert got.keys() == ref.keys()
        for n in ref:
            assert torch.allclose(got[n], ref[n], atol=1e-5), (which, n)


def test_8bit_optimizer_stores_8bit_moments_and_survives_a_checkpoint(params, tmp_path, base_dir, records):
    p = with_base(params, tmp_path, base_dir, optimizer="adamw8bit")
    state = train.setup(p, records[:16], [])
    assert type(state.optimizer).__name__ == "AdamW8bit"
    for b in train.micro_batches(state, 0, 0, 4)[:2]:
        train.train_step(state, [b], p.train)
    dtypes = {v.dtype for s in state.optimizer.state.values() for k, v in s.items() if k.startswith("state")}
    assert torch.uint8 in dtypes  # the heads' (64 x 256) moments are quantised; tensors < 4,096 values stay fp32
    ckpt = tmp_path / "last.pt"
    train.save_checkpoint(state, ckpt, "fp", {})
    fresh = train.setup(p, records[:16], [])
    assert train.load_checkpoint(fresh, ckpt, "fp") is not None  # loads weights-only, as every checkpoint
    _same(state.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"])


def _same(a, b, where="state"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_unknown_optimizer_is_refused():
    with pytest.raises(InputError, match="train.optimizer"):
        optim.make([{"params": [torch.nn.Parameter(torch.zeros(2))]}], "sgd8bit")


@pytest.mark.parametrize("frozen_fp32", [True, False])
def test_qlora_keeps_frozen_weights_16bit_unless_asked_and_still_trains(params, base_dir, records, frozen_fp32):
    from pipeline.collate import Collator
    from pipeline.config import Peft

    model, processor = modelmod.load(str(base_dir), quantize=True, dtype=torch.bfloat16)
    model = modelmod.apply_peft(model, Peft(method="qlora", frozen_fp32=frozen_fp32, dropout=0.0))
    frozen = {q.dtype for n, q in model.named_parameters() if not q.requires_grad and q.dtype.is_floating_point}
    assert frozen == ({torch.float32} if frozen_fp32 else {torch.bfloat16})  # vision tower, embeddings, norms
    batch = Collator(processor, 256)(records[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = modelmod.backbone(model).model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                             token_type_ids=batch["token_type_ids"], pixel_values=batch["pixel_values"])
        loss = modelmod.answer_ce(modelmod.backbone(model), out.last_hidden_state, batch["labels"])
    loss.backward()
    grads = [q.grad for n, q in model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)
