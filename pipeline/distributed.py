"""Data parallelism for `train`: torchrun launch, process group, sharding, gathers with gradient.

`python -m pipeline train` with `train.distributed.nproc_per_node > 1` (or `nnodes > 1`) re-runs itself
under torchrun (`python -m torch.distributed.run`, c10d rendezvous), so DVC, the DAG and users keep one
command. Every rank then holds a full replica (DDP) or a shard (FSDP) of the trainable model and reads
its contiguous slice of each global micro-batch; concatenated over ranks the slices are exactly the
single-process batch. Losses are written so that the mean over ranks of each rank's objective is the
single-process loss (see `mean_share` and `Gather`), which DDP's and FSDP's gradient averaging turn
into the single-process gradient.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import Distributed
from pipeline.errors import CheckFailed, InputError

STATUS_DIR = "PIPELINE_RANK_STATUS_DIR"  # where a failing rank writes its exit code and error
# The loss's own collectives (gathers, counts) run on a group of their own: DDP all-reduces gradient
# buckets on the default group from its own thread while backward runs, and two streams of collectives
# on one gloo group can interleave differently on two ranks.
_LOSS_GROUP = None


# ------------------------------------------------------------------------------------------ launch
def nproc(cfg: Distributed) -> int:
    """Processes on this node: `nproc_per_node`, or with 0 one per GPU (one on a machine without)."""
    return cfg.nproc_per_node or max(1, torch.cuda.device_count())


def wanted(cfg: Distributed) -> bool:
    """True when the params ask for more than one process and this process is not one of them yet."""
    return nproc(cfg) * cfg.nnodes > 1 and "RANK" not in os.environ


def check(cfg: Distributed, batch_size: int, world: int | None = None) -> None:
    """Refuse, before any work, what cannot run: more processes than devices (or CPU cores) on this node,
    a global micro-batch that does not split evenly over the processes."""
    if world is None:
        if cfg.nproc_per_node < 0 or cfg.nnodes < 1 or not 0 <= cfg.node_rank < cfg.nnodes:
            raise InputError(f"train.distributed: nproc_per_node {cfg.nproc_per_node}, nnodes {cfg.nnodes}, node_rank "
                             f"{cfg.node_rank}: need nproc_per_node >= 0 (0: one per GPU), nnodes >= 1 and 0 <= node_rank < nnodes")
        host, _, port = cfg.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InputError(f"train.distributed.rdzv_endpoint {cfg.rdzv_endpoint!r}: expected host:port (port 1-65535)")
        if torch.cuda.is_available():
            have, what = torch.cuda.device_count(), "GPUs"
        else:
            have, what = len(os.sched_getaffinity(0)), "CPU cores"
        if nproc(cfg) > have:
            raise InputError(f"train.distributed.nproc_per_node is {cfg.nproc_per_node} but this node has {have} {what}")
        world = nproc(cfg) * cfg.nnodes
    if batch_size % world:
        raise InputError(f"train.batch_size {batch_size} (the global micro-batch) is not divisible by the {world} "
                         f"processes (train.distributed: nproc_per_node {nproc(cfg)} x nnodes {cfg.nnodes})")


def launch(cfg: Distributed, argv: list[str]) -> dict:
    """Run `python -m pipeline <argv>` under torchrun on this node; wait for every rank.

    A rank that fails stops the whole run (torchrun ends the others); its own error and exit code are
    raised here, so the CLI exits as the rank did (2 bad input, 1 failed check, ...).
    """
    with tempfile.TemporaryDirectory(prefix="pipeline-ranks-") as status:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc(cfg)}",
               f"--nnodes={cfg.nnodes}", f"--node-rank={cfg.node_rank}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint={cfg.rdzv_endpoint}", f"--rdzv-id={cfg.rdzv_id}", "--max-restarts=0",
               "-m", "pipeline", *argv]
        env = {**os.environ, STATUS_DIR: status, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        code = subprocess.run(cmd, env=env).returncode
        if code == 0:
            summary = Path(status) / "summary.json"
            return json.loads(summary.read_text()) if summary.is_file() else {"node_rank": cfg.node_rank}
        failures = sorted(Path(status).glob("rank*.json"))
        if failures:
            first = json.loads(failures[0].read_text())
            err = {2: InputError, 1: CheckFailed}.get(first["exit_code"], CheckFailed)
            raise err(f"rank {first['rank']} failed: {first['error']}")
        raise CheckFailed(f"torchrun exited with {code} before a rank reported an error (a rank killed, or the "
                          f"rendezvous at {cfg.rdzv_endpoint} failed: see torchrun's message above)")


def is_rank_process() -> bool:
    """True in a rank that `launch` started (its launcher reports for it)."""
    return "RANK" in os.environ and STATUS_DIR in os.environ


def report_failure(code: int, error: str) -> None:
    """Called by the CLI in a rank that fails: leave the error for the launcher."""
    folder = os.environ.get(STATUS_DIR)
    if is_rank_process():
        rank = int(os.environ["RANK"])
        Path(folder, f"rank{rank:05d}.json").write_text(json.dumps({"rank": rank, "exit_code": code, "error": error}))


def report_summary(summary: dict) -> None:
    """Rank 0 hands its summary to the launcher (printed once, by the launching process)."""
    folder = os.environ.get(STATUS_DIR)
    if folder and rank() == 0:
        Path(folder, "summary.json").write_text(json.dumps(summary, default=str))


# --------------------------------------------------------------------------------- process group
def init(cfg: Distributed) -> torch.device:
    """Join the process group that torchrun set up (a no-op in a single process); returns the device."""
    if "RANK" not in os.environ or dist.is_initialized():
        return _device(int(os.environ.get("LOCAL_RANK", 0)))
    local = int(os.environ["LOCAL_RANK"])
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    global _LOSS_GROUP
    _LOSS_GROUP = dist.new_group(backend=backend)
    return _device(local)


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        dist.barrier()


def close() -> None:
    global _LOSS_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _LOSS_GROUP = None


def shard(batch: list, r: int | None = None, w: int | None = None) -> list:
    """This rank's contiguous slice of a global micro-batch (the slices concatenate to the batch)."""
    r, w = rank() if r is None else r, world_size() if w is None else w
    per = len(batch) // w
    return batch[r * per : (r + 1) * per]


# --------------------------------------------------------------------------------------- wrapping
def wrap(module: torch.nn.Module, strategy: str, unused: bool = False) -> torch.nn.Module:
    """DDP (a replica per rank, gradients averaged) or FSDP (parameters, gradients and optimizer state
    sharded; every transformer block its own unit); the module as it is in one process."""
    if not active():
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in module.modules():
            if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer")):
                fully_shard(m)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    # buffers (the text queue) are computed identically on every rank: nothing to broadcast
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=unused, broadcast_buffers=False)


def is_fsdp(module: torch.nn.Module) -> bool:
    return hasattr(module, "set_requires_gradient_sync")


def no_sync(wrapped: torch.nn.Module, last: bool):
    """Gradient accumulation: synchronise gradients on the last micro-batch of a step only."""
    if is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(last)
    elif not last and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def unsharded(wrapped: torch.nn.Module):
    """The root's own parameters gathered, for calls that bypass its forward (the caption anchor)."""
    if is_fsdp(wrapped):
        # the root's first forward would mark it root; a block called before that would claim the role
        wrapped._get_fsdp_state()._lazy_init()
        wrapped.unshard()
        try:
            yield
        finally:
            wrapped.reshard()
    else:
        yield


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter; a collective for a shard."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state(module: torch.nn.Module) -> dict:
    return {k: full(v).detach().cpu() for k, v in module.state_dict().items()}


def copy_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, or into this rank's shard of it."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


@torch.no_grad()
def load_full_state(module: torch.nn.Module, state: dict) -> None:
    own = dict(module.state_dict(keep_vars=True))
    for k, v in state.items():
        copy_full(own[k], v)


def optimizer_state(wrapped: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state, whole (gathered from the shards under FSDP: every rank calls it)."""
    if not is_fsdp(wrapped):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(wrapped, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(wrapped: torch.nn.Module, optimizer, state: dict) -> None:
    if not is_fsdp(wrapped):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(wrapped, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------ collectives
class Gather(torch.autograd.Function):
    """All ranks' (b, ...) tensors concatenated to (W·b, ...), with gradient.

    Every rank computes the same loss on the gathered tensor; the backward sums each slice's gradient
    over ranks (W times the gradient of the one loss), and DDP/FSDP's average over ranks divides by W
    again: the single-process gradient (open_clip's `gather_with_grad`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous(), group=_LOSS_GROUP)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_LOSS_GROUP)
        per = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * per : (dist.get_rank() + 1) * per]


def gather(x: torch.Tensor) -> torch.Tensor:
    return Gather.apply(x) if active() else x


def gather_objects(items: list) -> list:
    """All ranks' lists concatenated in rank order (captions, ids)."""
    if not active():
        return list(items)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items), group=_LOSS_GROUP)
    return [x for part in out for x in part]


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, without gradient."""
    if not active():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, group=_LOSS_GROUP)
    return x


def mean_share(total: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """This rank's surrogate of a global mean: W · (local sum) / (global count).

    Its mean over ranks is the single-process mean Σ sums / Σ counts, even when ranks hold different
    numbers of items (answer tokens); one process: total / count.
    """
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total * world_size() / all_sum(count).clamp(min=1)


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The ranks' logged surrogates averaged: the single-process figures."""
    if not active():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=_LOSS_GROUP)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t)}
