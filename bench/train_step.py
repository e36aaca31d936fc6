"""Benchmark: training-step throughput and peak memory of three trainers on the same model, data, batch.

(a) our trainer with the three-part loss, (b) our trainer with cross-entropy only, (c) TRL's SFTTrainer
with the collator of the published Gemma 3 QLoRA recipe (labels mask only pad and image tokens;
`modules_to_save=["lm_head", "embed_tokens"]`; gradient checkpointing). All three use LoRA r=16,
alpha=16, all-linear, on the built-in tiny Gemma 3 (4-bit needs a GPU to be meaningful: see
bench/gpu_train.py). Each variant runs in its own process so that its peak memory (max RSS on the CPU,
max allocated on a GPU) is its own. Prints a table and the ratios; saves bench/results/train_step.json.

    python bench/train_step.py [--steps 20] [--batch 8] [--warmup 3]

With `--nproc N` it measures data parallelism instead: trainer (a) under torchrun with 1, 2, ... N
processes (DDP, gloo on the CPU, NCCL on GPUs; the global batch split over the ranks, contrastive
embeddings gathered), and saves bench/results/train_step_nproc.json.

    python bench/train_step.py --nproc 2 [--steps 20] [--batch 8]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import base, config, curate, data as dataio, distributed, synth, train  # noqa: E402

VARIANTS = {"a": "ours, three-part loss", "b": "ours, cross-entropy only", "c": "TRL SFTTrainer, Gemma 3 recipe"}


def prepare(work: Path, params: config.Params, n: int) -> config.Params:
    """Synthetic lesions -> curated records -> built-in base, all under `work` (done once)."""
    paths = dataclasses.replace(params.paths, raw=str(work / "raw"), curated=str(work / "curated"),
                                split=str(work / "split"), models=str(work / "models"))
    p = dataclasses.replace(params, paths=paths, base=dataclasses.replace(params.base, steps=50, images=128))
    faults = {f.name: 0.0 for f in dataclasses.fields(params.synth.faults) if f.name != "mismatch_mode"}
    synth.run(dataclasses.replace(params.synth, n=n, image_size=64, faults=dataclasses.replace(params.synth.faults, **faults)),
              params.data, work / "raw")
    cfg = dataclasses.replace(params.curate, mismatch=dataclasses.replace(params.curate.mismatch, enabled=False))
    result = curate.run(dataio.read_manifest(work / "raw" / "manifest.csv"), work / "raw", cfg, params.data,
                        image_prefix=str(work / "raw"))
    dataio.write_jsonl(work / "records.jsonl", result.accepted)
    base.main(p)
    return p


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(p: config.Params, records: list[dict], steps: int, warmup: int, batch: int, ce_only: bool) -> dict:
    loss = dataclasses.replace(p.train.loss, w_con=0.0, w_mse=0.0) if ce_only else p.train.loss
    p = dataclasses.replace(p, train=dataclasses.replace(p.train, batch_size=batch, loss=loss, grad_accum=1))
    state = train.setup(p, records, [])
    train.preflight(records, state.processor, p, state.model, state.collator)  # as train.run does: encodes all
    anchor_s = 0.0 if ce_only else state.anchor.fill(state.model, state.collator, records)  # as train.run does
    batches = train.micro_batches(state, 0, 0, batch)
    times, tokens = [], 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train.train_step(state, [batches[i % len(batches)]], p.train)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            tokens += sum(len(state.collator.encoded(r).input_ids) for r in batches[i % len(batches)])
    return {"seconds": sum(times), "samples": steps * batch, "tokens": tokens, "anchor_setup_s": round(anchor_s, 2)}


def recipe_collator(processor):
    """The published Gemma 3 QLoRA recipe's collate_fn: loss on every token but pad and image tokens."""
    from pipeline.collate import open_image

    def collate(examples):
        texts = [processor.apply_chat_template(e["messages"], add_generation_prompt=False, tokenize=False).strip()
                 for e in examples]
        images = [[open_image(e["image"])] for e in examples]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].clone()
        boi = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.boi_token)
        labels[labels == processor.tokenizer.pad_token_id] = -100
        labels[labels == boi] = -100
        labels[labels == processor.tokenizer.image_token_id] = -100  # 262144 in the released checkpoints
        batch["labels"] = labels
        return batch

    return collate


def run_trl(p: config.Params, records: list[dict], steps: int, warmup: int, batch: int, work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    source = str(Path(p.paths.models) / "base")
    processor = AutoProcessor.from_pretrained(source)
    model = Gemma3ForConditionalGeneration.from_pretrained(source, attn_implementation="eager")
    peft_cfg = LoraConfig(lora_alpha=16, lora_dropout=0.05, r=16, bias="none", target_modules="all-linear",
                          task_type="CAUSAL_LM", modules_to_save=["lm_head", "embed_tokens"])
    args = SFTConfig(output_dir=str(work / "trl"), max_steps=warmup + steps, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=1, gradient_checkpointing=True, learning_rate=2e-4,
                     max_grad_norm=0.3, warmup_steps=1, logging_steps=1000, save_strategy="no", report_to=[],
                     dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                     bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    times: list[float] = []
    tokens = [0]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > warmup:
                times.append(time.perf_counter() - self.t0)

    collate = recipe_collator(processor)

    def counting(examples):
        b = collate(examples)
        tokens[0] += int(b["attention_mask"].sum())
        return b

    ds = Dataset.from_list([{"id": r["id"], "image": r["image"], "messages": r["messages"]} for r in records])
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=peft_cfg, data_collator=counting,
                         processing_class=processor, callbacks=[Timer()])
    trainer.train()
    per_step_tokens = tokens[0] / max(1, warmup + steps)
    return {"seconds": sum(times), "samples": len(times) * batch, "tokens": per_step_tokens * len(times)}


def child(variant: str, work: Path, steps: int, warmup: int, batch: int) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    p = config.load(work / "params.yaml")
    distributed.init(p.train.distributed)  # a no-op unless torchrun started this child
    records = dataio.read_jsonl(work / "records.jsonl")
    if variant == "c":
        r = run_trl(p, records, steps, warmup, batch, work)
    else:
        r = run_ours(p, records, steps, warmup, batch, ce_only=variant == "b")
    r["peak_memory_mb"] = round(peak_memory_mb(), 1)
    r["processes"] = distributed.world_size()
    if distributed.rank() == 0:
        print("RESULT " + json.dumps(r))
    distributed.close()


def scaling(work: Path, args) -> None:
    """Trainer (a) under torchrun with 1..N processes on this machine, the same global batch; the
    process counts alternate, `--repeats` rounds, so that a slow spell of the machine hits all of them."""
    import statistics

    cores = len(os.sched_getaffinity(0))
    rounds = [{n: one_scaling_run(work, args, n, cores) for n in range(1, args.nproc + 1)} for _ in range(args.repeats)]
    results = {}
    for n in rounds[0]:
        runs = [r[n] for r in rounds]
        rates = [r["samples_per_s"] for r in runs]
        results[n] = {**runs[0], "samples_per_s": statistics.mean(rates),
                      "samples_per_s_sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                      "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
                      "peak_memory_mb": max(r["peak_memory_mb"] for r in runs), "runs": runs}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {cores} cores"
    print(f"device: {device}; global batch {args.batch}; {args.steps} timed steps after {args.warmup} warm-up; "
          f"trainer (a), DDP; mean ± sd of {args.repeats} alternating rounds")
    print(f"{'processes':>10}{'threads each':>14}{'samples/s':>18}{'tokens/s':>10}{'peak MiB (rank 0)':>19}")
    for n, r in results.items():
        rate = f"{r['samples_per_s']:.1f} ± {r['samples_per_s_sd']:.1f}"
        print(f"{n:>10}{r['threads_per_process']:>14}{rate:>18}{r['tokens_per_s']:>10.0f}{r['peak_memory_mb']:>19.0f}")
    speedup = {n: r["samples_per_s"] / results[1]["samples_per_s"] for n, r in results.items()}
    print("speed-up over one process: " + ", ".join(f"{n}: {v:.2f}x" for n, v in speedup.items()))
    out = Path(args.out).with_name("train_step_nproc.json") if args.out.endswith("train_step.json") else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                               "results": results, "speedup": speedup}, indent=2))


def one_scaling_run(work: Path, args, n: int, cores: int) -> dict:
    """One torchrun job of trainer (a) with `n` processes, the cores shared out among them."""
    threads = max(1, cores // n)  # the cores shared out: n processes x threads <= cores
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", __file__, "--child", "a", "--work", str(work),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"{n} processes failed:\n{out.stderr[-4000:]}")
    r = json.loads(line[0][7:])
    r.update(threads_per_process=threads, samples_per_s=r["samples"] / r["seconds"],
             tokens_per_s=r["tokens"] / r["seconds"])
    return r


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--nproc", type=int, default=0, help="measure DDP with 1..N processes instead")
    ap.add_argument("--repeats", type=int, default=3, help="--nproc: alternating rounds (mean ± sd)")
    ap.add_argument("--child", choices=list(VARIANTS))
    ap.add_argument("--work")
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_step.json"))
    args = ap.parse_args()
    if args.child:
        return child(args.child, Path(args.work), args.steps, args.warmup, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        p = prepare(work, config.load(ROOT / "params.yaml"), args.n)
        raw = json.loads(json.dumps(dataclasses.asdict(p)))
        (work / "params.yaml").write_text(json.dumps(raw))  # JSON is YAML
        if args.nproc:
            return scaling(work, args)
        results = {}
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--child", v, "--work", str(work), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if not line:
                raise SystemExit(f"variant {v} failed:\n{out.stderr[-4000:]}")
            r = json.loads(line[0][7:])
            r["samples_per_s"] = r["samples"] / r["seconds"]
            r["tokens_per_s"] = r["tokens"] / r["seconds"]
            results[v] = r
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; batch {args.batch}; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'':34}{'samples/s':>10}{'tokens/s':>10}{'peak MiB':>10}")
    for v, name in VARIANTS.items():
        r = results[v]
        print(f"({v}) {name:<30}{r['samples_per_s']:>10.2f}{r['tokens_per_s']:>10.0f}{r['peak_memory_mb']:>10.0f}")
    ratios = {"a/b": results["a"]["samples_per_s"] / results["b"]["samples_per_s"],
              "b/c": results["b"]["samples_per_s"] / results["c"]["samples_per_s"]}
    print(f"throughput (a)/(b) = {ratios['a/b']:.2f} (target >= 0.85); (b)/(c) = {ratios['b/c']:.2f} (target >= 1.0)")
    print(f"(a) read every caption once before the loop (frozen-LM anchor): {results['a']['anchor_setup_s']} s of "
          f"setup, not in the step time")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "batch": args.batch, "steps": args.steps,
                                          "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
