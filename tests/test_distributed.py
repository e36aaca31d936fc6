"""train across processes: 2 ranks = 1 process exactly (the gathered contrastive loss), two nodes = one,
a killed 2-rank run resumes to the same adapter, bad settings refused before any work."""
import dataclasses
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import config, data as dataio, distributed
from pipeline.errors import InputError

from conftest import ROOT, free_port, kill_after_checkpoint

pytestmark = pytest.mark.slow


def project(root, base_dir, records, **train):
    """A project under `root`: split of 32 training and 8 validation records, the shared base, params."""
    (root / "split").mkdir(parents=True)
    (root / "models").mkdir()
    os.symlink(base_dir, root / "models" / "base")
    dataio.write_jsonl(root / "split" / "train.jsonl", records[:32])
    dataio.write_jsonl(root / "split" / "val.jsonl", records[32:40])
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"].update(split=str(root / "split"), models=str(root / "models"))
    raw["model"]["image_size"] = 64  # the shared test base reads 64 px
    raw["train"].update({"epochs": 5, "max_steps": 20, "batch_size": 8, "warmup_steps": 2, "checkpoint_every": 100,
                         **train})
    raw["train"]["peft"]["dropout"] = 0.0 if "peft" not in train else train["peft"]["dropout"]
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    return env


def train_cmd(root, *sets):
    return [sys.executable, "-m", "pipeline", "train", "--params", str(root / "params.yaml"),
            *[f"--set=train.distributed.{s}" for s in sets]]


def run_ok(cmd, root, env):
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    (root / "stderr.log").write_text(r.stderr)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def adapter(root) -> dict:
    out = root / "models" / "adapter"
    return {**load_file(out / "adapter_model.safetensors"), **load_file(out / "alignment_heads.safetensors")}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dir, records):
    """One process x micro-batch 8; two processes x 4 with and without the gather, and sharded (FSDP);
    20 steps each."""
    out = {}
    for name, sets in {"one": ["nproc_per_node=1"],
                       "two": ["nproc_per_node=2", f"rdzv_endpoint=127.0.0.1:{free_port()}"],
                       "two_local": ["nproc_per_node=2", "gather=false", f"rdzv_endpoint=127.0.0.1:{free_port()}"],
                       "two_fsdp": ["nproc_per_node=2", "strategy=fsdp", f"rdzv_endpoint=127.0.0.1:{free_port()}"]}.items():
        root = tmp_path_factory.mktemp(name)
        env = project(root, base_dir, records)
        out[name] = (root, run_ok(train_cmd(root, *sets), root, env))
    return out


def test_two_processes_give_the_single_process_adapter(runs):
    one, two = adapter(runs["one"][0]), adapter(runs["two"][0])
    assert max_diff(one, two) <= 1e-5
    assert any("lora_" in k for k in one) and any(k.startswith("heads.") for k in one)
    # ... after real learning: the adapter moved away from its initialisation (LoRA B starts at 0)
    assert max(float(v.abs().max()) for k, v in one.items() if "lora_B" in k) > 1e-3
    import json

    summary = json.loads(runs["two"][1].stdout)
    assert summary["processes"] == 2 and summary["steps"] == 20
    steps_one = (runs["one"][0] / "models" / "train_steps.csv").read_text().splitlines()
    steps_two = (runs["two"][0] / "models" / "train_steps.csv").read_text().splitlines()
    assert len(steps_one) == len(steps_two) == 21  # header + 20 steps, logged once (rank 0)


def test_fsdp_on_two_processes_gives_the_single_process_adapter(runs):
    """Parameters, gradients and optimizer state sharded (gloo on the CPU); the adapter is a normal PEFT folder."""
    assert max_diff(adapter(runs["one"][0]), adapter(runs["two_fsdp"][0])) <= 1e-5


def test_qlora_under_fsdp_gives_the_single_process_adapter(tmp_path, base_dir, records):
    """FSDP-QLoRA: the 4-bit data stored in float tensors, sharded like the rest (4 steps: 4-bit is slow here)."""
    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(max_steps=4, peft={**yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["peft"],
                                 "method": "qlora", "dropout": 0.0})
    for root, sets in ((one, ["nproc_per_node=1", "strategy=fsdp"]),
                       (two, ["nproc_per_node=2", "strategy=fsdp", f"rdzv_endpoint=127.0.0.1:{free_port()}"])):
        run_ok(train_cmd(root, *sets), root, project(root, base_dir, records, **kw))
    assert max_diff(adapter(one), adapter(two)) <= 1e-5


def test_checkpoint_choice_under_fsdp_matches_the_single_process_run(tmp_path, base_dir, records):
    """train.select on sharded parameters: each rank generates the validation split through the sharded
    model, both ranks take the same decision, and the kept epoch's adapter is the single process's."""
    import json

    one, two = tmp_path / "one", tmp_path / "two"
    kw = dict(max_steps=12, select={"metric": "f1_macro", "every": 1})  # 4 steps an epoch: checks at 4, 8, 12
    for root, sets in ((one, ["nproc_per_node=1"]),
                       (two, ["nproc_per_node=2", "strategy=fsdp", f"rdzv_endpoint=127.0.0.1:{free_port()}"])):
        run_ok(train_cmd(root, *sets), root, project(root, base_dir, records, **kw))
    sel = [json.loads((r / "models" / "train_metrics.json").read_text())["selection"] for r in (one, two)]
    assert [c["step"] for c in sel[0]["checks"]] == [4, 8, 12]
    assert [(c["step"], round(c["f1_macro"], 6)) for c in sel[0]["checks"]] == \
           [(c["step"], round(c["f1_macro"], 6)) for c in sel[1]["checks"]]
    assert sel[0]["epoch"] == sel[1]["epoch"]
    assert max_diff(adapter(one), adapter(two)) <= 1e-5


def test_without_the_gather_each_rank_has_its_own_negatives_and_the_result_differs(runs):
    one, local = adapter(runs["one"][0]), adapter(runs["two_local"][0])
    assert max_diff(one, local) > 1e-4


def test_two_nodes_of_one_process_give_the_same_adapter_as_one_node_of_two(runs, tmp_path, base_dir, records):
    env = project(tmp_path, base_dir, records)
    endpoint = f"rdzv_endpoint=127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(train_cmd(tmp_path, "nproc_per_node=1", "nnodes=2", f"node_rank={k}", endpoint),
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-4000:]
    assert max_diff(adapter(tmp_path), adapter(runs["two"][0])) <= 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_killed_two_process_run_resumes_to_the_uninterrupted_adapter(tmp_path, base_dir, records, strategy):
    """LoRA dropout on: every rank's RNG state is checkpointed and restored; under FSDP the shards are
    gathered into one checkpoint and sharded again on resume."""
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(max_steps=10, checkpoint_every=2)
    env_a, env_b = project(a, base_dir, records, **kw), project(b, base_dir, records, **kw)
    for root in (a, b):
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["train"]["peft"]["dropout"] = 0.1
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
    sets = ("nproc_per_node=2", f"strategy={strategy}")
    run_ok(train_cmd(a, *sets, f"rdzv_endpoint=127.0.0.1:{free_port()}"), a, env_a)
    proc = subprocess.Popen(train_cmd(b, *sets, f"rdzv_endpoint=127.0.0.1:{free_port()}"), cwd=b, env=env_b,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = b / "models" / "checkpoints" / "last.pt"
    # the launcher, torchrun and both ranks, as a machine that dies
    kill_after_checkpoint(proc, ckpt, 4, lambda: os.killpg(proc.pid, signal.SIGKILL))
    blob = torch.load(ckpt, weights_only=True)
    assert 4 <= blob["step"] < 10 and len(blob["rng"]) == 2 and not (b / "models" / "adapter").exists()
    assert not torch.equal(blob["rng"][0]["torch"], blob["rng"][1]["torch"])  # each rank its own dropout
    r = run_ok(train_cmd(b, *sets, f"rdzv_endpoint=127.0.0.1:{free_port()}"), b, env_b)
    assert '"resumed_from_step"' in r.stdout
    assert max_diff(adapter(a), adapter(b)) <= 1e-6


def _cfg(**kw) -> config.Distributed:
    return dataclasses.replace(config.Distributed(), **kw)


def test_settings_that_cannot_run_are_refused_before_any_work(tmp_path, base_dir, records):
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(InputError, match=f"nproc_per_node is {cores + 1} but this node has {cores} CPU cores"):
        distributed.check(_cfg(nproc_per_node=cores + 1), 8)
    with pytest.raises(InputError, match="batch_size 6 .* not divisible by the 4 processes"):
        distributed.check(_cfg(nproc_per_node=2, nnodes=2), 6)
    with pytest.raises(InputError, match="node_rank"):
        distributed.check(_cfg(nnodes=2, node_rank=2), 8)
    with pytest.raises(InputError, match="rdzv_endpoint"):
        distributed.check(_cfg(nproc_per_node=2, rdzv_endpoint="127.0.0.1:99999"), 8)
    assert distributed.nproc(_cfg(nproc_per_node=0)) == max(1, torch.cuda.device_count())  # 0: one per GPU
    env = project(tmp_path, base_dir, records, batch_size=7)
    r = subprocess.run(train_cmd(tmp_path, "nproc_per_node=2"), cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "not divisible by the 2 processes" in r.stderr
    assert not (tmp_path / "models" / "adapter").exists()


def test_a_rank_that_fails_stops_the_run_with_its_error(tmp_path, base_dir, records):
    env = project(tmp_path, base_dir, records)
    bad = tmp_path / "split" / "train.jsonl"
    rows = dataio.read_jsonl(bad)
    rows[5]["image"] = str(tmp_path / "vanished.png")  # the rank that reads it fails in its pre-flight
    dataio.write_jsonl(bad, rows)
    r = subprocess.run(train_cmd(tmp_path, "nproc_per_node=2", f"rdzv_endpoint=127.0.0.1:{free_port()}"),
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "rank " in r.stderr and "vanished.png" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "models" / "adapter").exists()
