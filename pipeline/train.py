"""`train`: PEFT fine-tune with the three-part alignment loss, written out as setup / step / evaluate / save.

Resumable: every `checkpoint_every` optimizer steps the trainable state, optimizer, scheduler, every
rank's RNG states and the data position are written atomically to `models/checkpoints/last.pt` (tensors
and plain containers only, loaded with `weights_only=True`); a re-run with the same params and data
resumes from it and ends with the same adapter as an uninterrupted run.

Checkpoint choice (`train.select`): the adapter holds the last epoch's weights, or (`metric: f1_macro`)
those of the epoch whose greedy answers on the validation split scored the best macro-F1, checked every
`every` epochs and after the last; the best weights so far travel in the checkpoint.

Weight averaging (`train.ema` > 0): after every optimizer step an exponential moving average of the
trainable tensors is updated (the first step's weights, then `ema * average + (1 - ema) * weights`, as
torch's `AveragedModel` with `get_ema_multi_avg_fn`), kept in float32 and in the checkpoint. The
validation loss, the `train.select` checks and the saved adapter all use the average, not the last step's
weights.

Data parallel (`train.distributed`): the same loop on every rank of a torchrun job, each rank reading its
slice of every global micro-batch, the model wrapped in DDP or FSDP; rank 0 alone writes.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import audit, config, data as dataio, distributed, losses, model as modelmod, optim, scoring
from pipeline.collate import Collator
from pipeline.errors import CheckFailed, InputError

TERMS = ("contrastive", "ce", "mse", "total")


# ----------------------------------------------------------------------------------------- forward
def forward_terms(model, heads, loss_fn: losses.AlignmentLoss, batch: dict, text_grad: bool,
                  anchor: modelmod.TextAnchor | None = None, ce_chunk: int = 0) -> losses.Terms:
    """One forward pass over a batch -> every loss term (docs/design.md §6).

    The image features are computed once and handed to the LM (`mm_encoder_outputs`); the caption side
    comes from `anchor` (frozen base, cached) unless `text_grad`, where the adapted LM reads the caption
    in a text-only pass with gradient. `ce_chunk`: see `model.answer_ce`.
    """
    base = modelmod.backbone(model)
    align = loss_fn.w_con > 0 or loss_fn.w_mse > 0
    image_out = base.model.get_image_features(batch["pixel_values"], return_dict=True)
    out = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"], mm_encoder_outputs={"image": image_out})
    ce = modelmod.answer_ce(base, out.last_hidden_state, batch["labels"], ce_chunk)
    if not align:
        zero = ce.new_zeros(())
        return losses.Terms(contrastive=zero, ce=ce, mse=zero, total=loss_fn.w_ce * ce)
    v = heads.embed_image(image_out.pooler_output.float())  # (B, D)
    if text_grad or anchor is None:
        with torch.set_grad_enabled(text_grad and torch.is_grad_enabled()):
            text_hidden = base.model.language_model(input_ids=batch["caption_ids"],
                                                    attention_mask=batch["caption_attention"]).last_hidden_state
        t = heads.embed_text(text_hidden.float(), batch["caption_mask"])  # (B, D)
    else:
        t = heads.embed_pooled(anchor(model, batch))  # (B, D)
    captions = distributed.gather_objects(batch["captions"]) if loss_fn.gather else batch["captions"]
    return loss_fn(v, t, ce, groups=losses.caption_groups(captions), keys=losses.caption_keys(captions))


class Objective(nn.Module):
    """Model, alignment heads and loss as one module: what DDP / FSDP wrap, so that every trainable
    parameter is synchronised by one wrapper."""

    def __init__(self, model, heads, loss_fn, ce_chunk: int = 0):
        super().__init__()
        self.model, self.heads, self.loss_fn, self.ce_chunk = model, heads, loss_fn, ce_chunk

    def forward(self, batch: dict, text_grad: bool, anchor: modelmod.TextAnchor | None = None) -> losses.Terms:
        return forward_terms(self.model, self.heads, self.loss_fn, batch, text_grad, anchor, self.ce_chunk)


# ------------------------------------------------------------------------------------------- setup
def param_groups(model, heads, loss_fn, lr: config.Lr) -> list[dict]:
    """Vision side (vision tower, projector, image head) and text side (everything else trainable)."""
    vision, text = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (vision if any(m in name for m in modelmod.VISION_MODULES) else text).append(p)
    vision += list(heads.image.parameters())
    text += list(heads.text.parameters()) + [p for p in loss_fn.parameters() if p.requires_grad]
    return [{"name": "vision", "params": vision, "lr": lr.vision}, {"name": "text", "params": text, "lr": lr.text}]


@dataclass
class State:
    model: object
    processor: object
    heads: modelmod.AlignmentHeads
    loss_fn: losses.AlignmentLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    collator: Collator
    train: list[dict]
    val: list[dict]
    steps_per_epoch: int
    total_steps: int
    device: torch.device
    wrapped: nn.Module  # the Objective, under DDP / FSDP across processes: what the training step calls
    anchor: modelmod.TextAnchor = field(default_factory=modelmod.TextAnchor)
    step: int = 0
    history: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)  # train.select: {epoch, step, f1_macro} per validation check
    best: dict | None = None  # ... and the best check's weights (see `weights`)
    ema: dict | None = None  # train.ema: the moving average of every trainable tensor (see `update_ema`)


def setup(params: config.Params, train: list[dict], val: list[dict]) -> State:
    t = params.train
    torch.manual_seed(t.seed)
    device, dtype = modelmod.device_and_dtype()
    model, processor = modelmod.load_trainable(params, device, dtype)
    modelmod.checkpoint_towers(model, t.grad_checkpointing)
    hidden = modelmod.backbone(model).config.get_text_config().hidden_size
    heads = modelmod.AlignmentHeads(hidden, t.loss.embed_dim).to(device)
    loss_fn = losses.AlignmentLoss(t.loss.w_con, t.loss.w_ce, t.loss.w_mse, t.loss.tau, t.loss.learnable_tau,
                                   t.loss.queue_size, t.loss.embed_dim, t.distributed.gather).to(device)
    align = t.loss.w_con > 0 or t.loss.w_mse > 0
    wrapped = distributed.wrap(Objective(model, heads, loss_fn, t.ce_chunk), t.distributed.strategy, unused=not align)
    # after wrapping: FSDP replaces the parameters by their shards
    optimizer = optim.make(param_groups(model, heads, loss_fn, t.lr), t.optimizer)
    steps_per_epoch = max(1, len(train) // (t.batch_size * t.grad_accum))
    total = steps_per_epoch * t.epochs if not t.max_steps else min(t.max_steps, steps_per_epoch * t.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.schedule(t.warmup_steps, total))
    state = State(model, processor, heads, loss_fn, optimizer, scheduler, Collator(processor, t.max_length),
                  train, val, steps_per_epoch, total, device, wrapped)
    if t.ema:
        state.ema = {n: p.detach().float().clone() for n, p in trainable(state)}
    return state


# ------------------------------------------------------------------------------ weight averaging
def trainable(state: State) -> list[tuple[str, torch.Tensor]]:
    """Every trainable tensor (this rank's shard of it under FSDP) by a name unique across the model,
    the alignment heads and the loss."""
    return [(f"{part}.{n}", p) for part, module in (("model", state.model), ("heads", state.heads),
                                                     ("loss_fn", state.loss_fn))
            for n, p in module.named_parameters() if p.requires_grad]


@torch.no_grad()
def update_ema(state: State, decay: float) -> None:
    """After optimizer step `state.step`: the average takes the first step's weights, then moves
    `1 - decay` of the way towards the current ones (AveragedModel's EMA)."""
    for n, p in trainable(state):
        if state.step <= 1:
            state.ema[n].copy_(p.detach())
        else:
            state.ema[n].lerp_(p.detach().float(), 1 - decay)


@torch.no_grad()
def load_average(state: State) -> None:
    """The moving average copied into the trainable weights."""
    for n, p in trainable(state):
        p.copy_(state.ema[n])


@contextmanager
def averaged(state: State):
    """The moving average in place of the trainable weights for the block (nothing without `train.ema`);
    the live weights come back after it."""
    if state.ema is None:
        yield
        return
    params = trainable(state)
    live = [p.detach().clone() for _, p in params]
    load_average(state)
    try:
        yield
    finally:
        with torch.no_grad():
            for (_, p), value in zip(params, live):
                p.copy_(value)


# --------------------------------------------------------------------------------- augmentation
def augment(pixels: torch.Tensor, cfg: config.Augment, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """Random shift, brightness, contrast and flips, drawn per image from torch's global generator (saved in
    every checkpoint, so a resumed run draws the same). `pixels`: (B, 3, S, S) after the processor's
    normalisation, whose [lo, hi] is the pixel range [0, 1]."""
    b, _, size, _ = pixels.shape
    out = pixels
    pad = int(cfg.shift * size)
    if pad:  # each image cut from its own place of an edge-replicated frame
        frame = F.pad(out, (pad, pad, pad, pad), mode="replicate")
        at = torch.randint(0, 2 * pad + 1, (b, 2)).tolist()
        out = torch.stack([frame[k, :, i : i + size, j : j + size] for k, (i, j) in enumerate(at)])
    if cfg.contrast:
        c = 1 + (2 * torch.rand(b, 1, 1, 1) - 1) * cfg.contrast  # (B, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * c.to(out) + mean
    if cfg.brightness:
        out = out + (2 * torch.rand(b, 1, 1, 1) - 1).to(out) * cfg.brightness * (hi - lo)
    for flip, dim in ((cfg.hflip, 3), (cfg.vflip, 2)):
        if flip:
            pick = (torch.rand(b) < 0.5).to(out.device)
            out = torch.where(pick[:, None, None, None], out.flip(dim), out)
    return out.clamp(lo, hi) if (cfg.contrast or cfg.brightness) else out


def pixel_range(processor) -> tuple[float, float]:
    """Where the pixel values 0 and 1 land after the image processor's normalisation (SigLIP's: -1, 1)."""
    ip = processor.image_processor
    mean, std = float(np.mean(ip.image_mean)), float(np.mean(ip.image_std))
    return (0 - mean) / std, (1 - mean) / std


# --------------------------------------------------------------------------------- step / evaluate
def micro_batches(state: State, epoch: int, seed: int, batch_size: int) -> list[list[dict]]:
    """The epoch's batches, in a seeded order (the same on a resumed run)."""
    order = torch.randperm(len(state.train), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    n = len(order) // batch_size
    return [[state.train[i] for i in order[b * batch_size : (b + 1) * batch_size]] for b in range(n)]


def train_step(state: State, batches: list[list[dict]], t: config.Train) -> dict[str, float]:
    """One optimizer step over `grad_accum` global micro-batches (this rank computes its slice of each);
    stops on a non-finite term."""
    state.model.train()
    sums = dict.fromkeys(TERMS, 0.0)
    for i, mb in enumerate(batches):
        batch = modelmod.to_device(state.collator(distributed.shard(mb)), state.device)
        if t.augment != config.Augment():
            batch["pixel_values"] = augment(batch["pixel_values"], t.augment, *pixel_range(state.processor))
        with distributed.no_sync(state.wrapped, last=i == len(batches) - 1):
            terms = state.wrapped(batch, t.loss.text_grad, state.anchor)
            for name, value in distributed.mean_over_ranks(terms.as_floats()).items():
                if not math.isfinite(value):
                    raise CheckFailed(f"non-finite loss at step {state.step + 1}: loss/{name} = {value}")
                sums[name] += value / len(batches)
            (terms.total / len(batches)).backward()
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    lrs = {f"lr/{g['name']}": g["lr"] for g in state.optimizer.param_groups}
    state.scheduler.step()
    state.step += 1
    if state.ema is not None:
        update_ema(state, t.ema)
    return {**{f"loss/{k}": v for k, v in sums.items()}, **lrs}


@torch.no_grad()
def validation_loss(state: State, records: list[dict], batch_size: int) -> dict[str, float]:
    """Mean loss terms over `records` in global batches of `batch_size` (no gradient)."""
    state.model.eval()
    sums, n = dict.fromkeys(TERMS, 0.0), 0
    for i in range(0, len(records) - batch_size + 1, batch_size):
        batch = modelmod.to_device(state.collator(distributed.shard(records[i : i + batch_size])), state.device)
        terms = state.wrapped(batch, False, state.anchor)
        for k, v in distributed.mean_over_ranks(terms.as_floats()).items():
            sums[k] += v
        n += 1
    return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}


# ------------------------------------------------------------------------------ checkpoint choice
def validation_f1(state: State, params: config.Params) -> float:
    """Macro-F1 of the greedy answers on the validation split with the weights as they are now, parsed as
    `evaluate` parses them (`data.label_pattern`; an unparseable answer counts as wrong). Every rank
    generates the whole split (the answers are the same on each): no collective inside generation."""
    e = params.evaluate
    state.model.eval()
    with distributed.unsharded(state.wrapped):
        ev = scoring.Evaluator(state.model, state.processor, state.heads, {}, state.device, e.max_new_tokens,
                               e.batch_size, params.data.label_pattern, tuple(params.data.labels))
        pred = ev.predict(state.val)  # the tokenizer's padding as it was after: the processor is saved unchanged
    return scoring.f1_macro([r["label"] for r in state.val], pred, params.data.labels)


def weights(state: State) -> dict:
    """A copy of everything the adapter saves (trainable tensors, heads, loss parameters); a collective
    under FSDP, so every rank calls it."""
    return {"model": trainable_state(state),
            "heads": {k: v.clone() for k, v in distributed.full_state(state.heads).items()},
            "loss_fn": {k: v.clone() for k, v in distributed.full_state(state.loss_fn).items()}}


@torch.no_grad()
def load_weights(state: State, w: dict) -> None:
    named = dict(state.model.named_parameters())
    for n, v in w["model"].items():
        distributed.copy_full(named[n], v)
    distributed.load_full_state(state.heads, w["heads"])
    distributed.load_full_state(state.loss_fn, w["loss_fn"])


def check_epoch(state: State, params: config.Params, epoch: int, tracker=None) -> None:
    """After `epoch`: a validation check if `train.select` asks for one here and it is not on record (a
    run resumed from a checkpoint written at the epoch's last step still makes it); the best weights kept."""
    t = params.train
    if t.select.metric == "last" or not state.val or any(c["epoch"] == epoch for c in state.checks):
        return
    done = state.step >= min((epoch + 1) * state.steps_per_epoch, state.total_steps)
    last = state.step >= state.total_steps or epoch == t.epochs - 1
    if not done or not (last or (epoch + 1) % t.select.every == 0):
        return
    with averaged(state):  # train.ema: the average is what is judged and kept
        f1 = distributed.mean_over_ranks({"f1": validation_f1(state, params)})["f1"]  # one decision on every rank
        state.checks.append({"epoch": epoch, "step": state.step, "f1_macro": f1})
        if tracker:
            tracker.log_metrics({"val/f1_macro": f1}, state.step)
        if state.best is None or f1 > state.best["f1_macro"]:  # ties keep the earlier epoch
            state.best = {"epoch": epoch, "step": state.step, "f1_macro": f1, "weights": weights(state)}


def selection(state: State, t: config.Train) -> dict:
    """What `train.select` chose, for train_metrics.json: the kept epoch, and every check."""
    if t.select.metric == "last" or state.best is None:
        return {"metric": "last"}
    return {"metric": t.select.metric, "every": t.select.every, "epoch": state.best["epoch"],
            "step": state.best["step"], "f1_macro": state.best["f1_macro"],
            "last_f1_macro": state.checks[-1]["f1_macro"], "checks": state.checks}


# ---------------------------------------------------------------------------------- checkpoints
def fingerprint(params: config.Params, train: list[dict]) -> str:
    """What a checkpoint is valid for: the train/model params, the number of processes and the
    training data (where the rendezvous is, or which node this is, does not matter)."""
    flat = {k: v for k, v in config.flatten(params.train).items() if not k.startswith("distributed.")}
    flat["distributed"] = [distributed.world_size(), params.train.distributed.strategy, params.train.distributed.gather]
    if params.train.select.metric != "last":  # how the saved checks were scored
        flat["select_scoring"] = [params.data.label_pattern, list(params.data.labels), params.evaluate.max_new_tokens,
                                  params.evaluate.batch_size]
    h = hashlib.sha256(json.dumps({"train": flat, "model": config.flatten(params.model)},
                                  sort_keys=True, default=str).encode())
    for r in train:
        h.update(r["id"].encode())
        h.update(r.get("image_sha256", "").encode())
    return h.hexdigest()


def trainable_state(state: State) -> dict:
    """Full (unsharded) trainable tensors; a collective under FSDP, so every rank calls it."""
    return {n: distributed.full(p).detach().cpu().clone() for n, p in state.model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    """This process's RNG states as tensors and numbers (loadable with weights_only=True)."""
    _, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss,
            "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
            "numpy_gauss": [int(has_gauss), float(cached)]}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(int(x) for x in rng["python"].tolist()), rng["python_gauss"]))
    has_gauss, cached = rng["numpy_gauss"]
    np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], int(has_gauss), cached))


def save_checkpoint(state: State, path: Path, fp: str, extra: dict) -> None:
    """Every rank calls it (RNG states and FSDP shards are gathered); rank 0 writes, atomically: a kill
    mid-write leaves the previous checkpoint intact."""
    blob = {"fingerprint": fp, "step": state.step, "model": trainable_state(state),
            "heads": distributed.full_state(state.heads), "loss_fn": distributed.full_state(state.loss_fn),
            "queue": state.loss_fn.queue.cpu(), "queue_keys": state.loss_fn.queue_keys.cpu(), "optimizer": distributed.optimizer_state(state.wrapped, state.optimizer),
            "scheduler": state.scheduler.state_dict(), "history": state.history,
            "checks": state.checks, "best": state.best,
            "ema": {n: distributed.full(v).cpu() for n, v in state.ema.items()} if state.ema is not None else None,
            "rng": distributed.gather_objects([rng_state()]), **extra}
    if distributed.rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(blob, tmp)
        os.replace(tmp, path)
    distributed.barrier()


def read_checkpoint(path: Path) -> dict:
    """Tensors and plain containers only: a checkpoint that holds anything else (a pickled object, which
    could run code on loading) is refused, not run."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"checkpoint {path}: refused, it holds more than tensors and plain containers "
                         f"({first}); delete it to start over") from None


def load_checkpoint(state: State, path: Path, fp: str) -> dict | None:
    """Restore `state` from `path` if it was written for the same params, data and number of processes."""
    if not path.is_file():
        return None
    blob = read_checkpoint(path)
    if blob.get("fingerprint") != fp:
        return None
    load_weights(state, blob)
    state.loss_fn.queue = blob["queue"].to(state.device)
    state.loss_fn.queue_keys = blob.get("queue_keys", torch.zeros(0, dtype=torch.long)).to(state.device)
    distributed.load_optimizer_state(state.wrapped, state.optimizer, blob["optimizer"])
    state.scheduler.load_state_dict(blob["scheduler"])
    state.step, state.history = blob["step"], blob["history"]
    state.checks, state.best = blob.get("checks", []), blob.get("best")
    if state.ema is not None:
        with torch.no_grad():
            for n, v in blob["ema"].items():
                distributed.copy_full(state.ema[n], v)
    set_rng_state(blob["rng"][distributed.rank()])
    return blob


# ------------------------------------------------------------------------------------------ save
def adapter_tensors(state: State) -> tuple[dict, dict]:
    """(PEFT state dict, heads) as full tensors: a collective under FSDP, so every rank calls it."""
    peft_sd = {k: distributed.full(v).detach().cpu() for k, v in state.model.state_dict().items()
               if "lora_" in k or ".modules_to_save." in k}  # LoRA, and the fully trained copies of full_vision
    heads = {f"heads.{k}": v.contiguous() for k, v in distributed.full_state(state.heads).items()}
    if state.loss_fn.log_scale is not None:
        heads["loss.log_scale"] = distributed.full(state.loss_fn.log_scale).detach().cpu().reshape(1)
    return peft_sd, heads


def save_adapter(state: State, out: Path, params: config.Params, tensors: tuple[dict, dict] | None = None,
                 seen: dict[str, list[str]] | None = None) -> None:
    """PEFT adapter folder (+ processor, + alignment heads) that PeftModel.from_pretrained loads, and the
    ids of the samples it trained and validated on (`seen_ids.json`, hashed in `pipeline_meta.json`): a
    later comparison uses only samples that no compared model has seen."""
    from safetensors.torch import save_file

    peft_sd, heads = tensors or adapter_tensors(state)
    state.model.save_pretrained(out, state_dict=peft_sd)
    state.processor.save_pretrained(out)
    save_file(heads, out / "alignment_heads.safetensors")
    meta = modelmod.adapter_meta(params, state.model)
    if seen is not None:
        seen = {k: sorted(v) for k, v in seen.items()}
        dataio.write_json(out / modelmod.SEEN_IDS, seen)
        meta["seen_ids_sha256"] = modelmod.seen_ids_sha256(seen)
    dataio.write_json(out / "pipeline_meta.json", meta)


def write_steps_csv(path: Path, history: list[dict]) -> None:
    cols = ["step", "epoch"] + [f"loss/{k}" for k in TERMS] + ["lr/vision", "lr/text"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(history)


# ------------------------------------------------------------------------------------------ main
def preflight(records: list[dict], processor, params: config.Params, model, collator: Collator | None = None) -> dict:
    """Audit every sample before any training; fails listing the offending ids."""
    tokens = modelmod.backbone(model).config.mm_tokens_per_image
    report = audit.run(records, processor, tokens, params.train.max_length, collator)
    if report["offending"]:
        ids = sorted(report["offending"])
        raise CheckFailed(f"pre-flight audit: {len(ids)} sample(s) fail: {ids[:20]} "
                          f"(first: {report['offending'][ids[0]]})")
    return report


def run(params: config.Params, train: list[dict], val: list[dict], tracker=None) -> dict:
    """The loop: setup, pre-flight, steps (with checkpoints), evaluate each epoch, save.

    Under torchrun every rank runs it; `tracker` is given on rank 0 only, and rank 0 alone writes.
    """
    t = params.train
    if not train:
        raise InputError("train: no training samples")
    if t.select.metric != "last":
        if t.select.every < 1:
            raise InputError(f"params: train.select.every must be at least 1, got {t.select.every}")
        if not val:
            raise InputError(f"train: train.select.metric is {t.select.metric!r} but the validation split is empty")
        scoring.check_records(val, params.data.labels, "val", "train.select")
    if not 0 <= t.ema < 1:
        raise InputError(f"params: train.ema must be in [0, 1) (0: no averaging), got {t.ema}")
    distributed.check(t.distributed, t.batch_size, distributed.world_size())
    state = setup(params, train, val)
    report = preflight(train + val, state.processor, params, state.model, state.collator)
    if not t.loss.text_grad and (t.loss.w_con or t.loss.w_mse):
        with distributed.unsharded(state.wrapped):  # the anchor reads through the LM, not the root's forward
            report["anchor_seconds"] = round(state.anchor.fill(state.model, state.collator, train + val), 2)
    models = Path(params.paths.models)
    ckpt, fp = models / "checkpoints" / "last.pt", fingerprint(params, train)
    resumed = load_checkpoint(state, ckpt, fp)
    if tracker:
        tracker.start(resumed.get("run_id") if resumed else None, params, report)
    start = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=state.total_steps, initial=state.step, desc="train", unit="step",
               disable=None if distributed.rank() == 0 else True)
    for epoch in range(t.epochs):
        if state.step >= state.total_steps:
            break  # `train.max_steps` reached: no more epochs (and no more validation passes)
        batches = micro_batches(state, epoch, t.seed, t.batch_size)
        trained = False
        for s in range(state.steps_per_epoch):
            global_step = epoch * state.steps_per_epoch + s
            if global_step < state.step:
                continue  # consumed before the checkpoint
            if state.step >= state.total_steps:
                break
            trained = True
            row = train_step(state, batches[s * t.grad_accum : (s + 1) * t.grad_accum], t)
            row.update(step=state.step, epoch=epoch)
            state.history.append(row)
            bar.update(1)
            bar.set_postfix(total=f"{row['loss/total']:.3f}", ce=f"{row['loss/ce']:.3f}")
            if tracker:
                tracker.log_step(row)
            if state.step % t.checkpoint_every == 0:
                save_checkpoint(state, ckpt, fp, {"run_id": tracker.run_id if tracker else None})
        if trained and val and (tracker or distributed.active()):  # every rank computes it (collectives), rank 0 logs
            with averaged(state):
                val_loss = validation_loss(state, val, t.batch_size)
            if tracker:
                tracker.log_metrics(val_loss, state.step)
        check_epoch(state, params, epoch, tracker)
    bar.close()
    chosen = selection(state, t)
    if "epoch" in chosen:  # the adapter, the final validation loss and the saved tensors: the chosen epoch's
        load_weights(state, state.best["weights"])
    elif state.ema is not None:  # ... or the moving average's
        load_average(state)
    metrics = {"steps": state.step, "seconds": round(time.perf_counter() - start, 2),
               "final": {k: v for k, v in state.history[-1].items() if k.startswith("loss/")} if state.history else {},
               "first": {k: v for k, v in state.history[0].items() if k.startswith("loss/")} if state.history else {},
               "val": validation_loss(state, val, t.batch_size) if val else {}, "preflight_passed": report["passed"],
               "mlflow_run_id": tracker.run_id if tracker else None,
               "resumed_from_step": int(resumed["step"]) if resumed else None, "selection": chosen}
    metrics["processes"] = distributed.world_size()
    metrics.update(modelmod.peak_memory())
    tensors = adapter_tensors(state)
    if distributed.rank() != 0:
        return metrics
    with dataio.atomic_dir(models / "adapter") as out:
        save_adapter(state, out, params, tensors, seen={"train": [r["id"] for r in train], "val": [r["id"] for r in val]})
    dataio.write_json(models / "train_metrics.json", metrics)
    write_steps_csv(models / "train_steps.csv", state.history)
    dataio.write_json(models / "preflight.json", report)
    if tracker:
        tracker.finish(metrics, models)
    ckpt.unlink(missing_ok=True)
    return metrics


def main(params: config.Params, argv: list[str] = ()) -> dict:
    """The stage. With `train.distributed` asking for several processes it re-runs itself (with the
    same `argv`) under torchrun; each rank then comes back here, joins the process group and trains."""
    split = Path(params.paths.split)
    for name in ("train.jsonl", "val.jsonl"):
        if not (split / name).is_file():
            raise InputError(f"train: {split / name} not found (run split first)")
    d = params.train.distributed
    if distributed.wanted(d):
        distributed.check(d, params.train.batch_size)
        return distributed.launch(d, ["train", *argv])
    from pipeline.tracking import Tracker

    distributed.init(d)
    try:
        tracker = Tracker(params) if distributed.rank() == 0 else None
        metrics = run(params, dataio.read_jsonl(split / "train.jsonl"), dataio.read_jsonl(split / "val.jsonl"), tracker)
        distributed.report_summary(metrics)
        return metrics
    finally:
        distributed.close()
