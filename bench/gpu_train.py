"""GPU benchmark: QLoRA training at Gemma 3 4B's shapes (the stand-in of `base --shape`, random weights).

Side by side in one run, each arm in its own process (its own peak memory), on the same 896-px samples
at the same effective batch of 4:

  recipe   the published Gemma 3 QLoRA recipe (Google's "fine-tune Gemma for vision tasks" guide): NF4 +
           double quantisation (bf16 storage), eager attention, LoRA r=16 all-linear, `embed_tokens` and
           `lm_head` fully trained (modules_to_save), micro-batch 1 x accumulation 4, gradient
           checkpointing, loss over every non-pad non-image token through the full (B, T, 262k) logits;
  ours ... our `train` stage (`train.setup` + `train.train_step`, the three-part loss, answer-only
           cross-entropy, the vision tower kept bf16, no embedding training, micro-batch 4), then each
           memory lever of params.yaml added in turn (ARMS): sdpa attention, vision-tower checkpointing,
           fused linear cross-entropy, frozen weights kept bf16, text checkpointing, 8-bit optimizer
           states, and last the micro-batch x accumulation split.

Reported per arm: samples/s, tokens/s, peak GiB (torch.cuda.max_memory_allocated) and MFU: model FLOPs
per second over the device's dense bf16 peak, with model FLOPs per sample (README, *Benchmarks*)

    6 * (N_vision * P + N_projector * I + N_text * T + H * V * A) + 12 * (L_v * P^2 * d_v + L_t * T^2 * d_t)

N_* parameters (N_text without the embedding), P patches per image (4,096 at 896 px), I image tokens
(256), T tokens in the sequence, A tokens whose logits the arm's loss reads, H the text width, V the
vocabulary, L layers and d the attention width of each tower. Collation (the image processor) is done
before the clock starts, for every arm. Target: ours >= 3x the recipe's samples/s at <= 50 % of its peak.

    python bench/gpu_train.py [--steps 6] [--warmup 2] [--arms recipe,ours,...]   # one GPU, ~10 minutes
    python bench/gpu_train.py --tiny                                             # CPU smoke test

The GPU image lacks bitsandbytes: carry its wheel (README, "GPU benchmark").
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# each "ours" arm adds its overrides to the previous one's (params.yaml keys, as `--set`)
ARMS = [
    ("recipe", None),
    ("ours", ["model.attn_implementation=eager"]),
    ("+sdpa", ["model.attn_implementation=sdpa"]),
    ("+vision_ckpt", ["train.grad_checkpointing=vision"]),
    ("+fused_ce", ["train.ce_chunk=256"]),
    ("+frozen_bf16", ["train.peft.frozen_fp32=false"]),
    ("+text_ckpt", ["train.grad_checkpointing=true"]),
    ("+8bit_adam", ["train.optimizer=paged_adamw8bit"]),
    ("+micro2x2", ["train.batch_size=2", "train.grad_accum=2"]),
]
BASE_OVERRIDES = ["train.peft.method=qlora", "train.peft.keep_vision_16bit=true", "train.batch_size=4",
                  "train.grad_accum=1", "train.max_length=1024", "train.warmup_steps=1", "train.max_grad_norm=1.0"]
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10": 125.0}


def overrides_of(arm: str) -> list[str]:
    names = [n for n, _ in ARMS]
    out = list(BASE_OVERRIDES)
    for name, sets in ARMS[1 : names.index(arm) + 1]:
        out += sets
    return out


def records(folder: Path, n: int) -> list[dict]:
    """`n` chat samples of generic scenes (images saved at 448 px; the processor resizes to 896)."""
    from pipeline import base

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for s in base.generic_samples(n, seed=1, size=448, system_prompt="You describe images."):
        path = folder / f"{s['id']}.png"
        s["image"].save(path)
        out.append({"id": s["id"], "image": str(path), "messages": s["messages"], "label": "scene"})
    return out


class Precollated:
    """A collator that hands back batches collated before the clock started (same ids, same batch)."""

    def __init__(self, collator, batches: list[list[dict]]):
        self.inner = collator
        self.cache = {tuple(r["id"] for r in b): collator(b) for b in batches}

    def __call__(self, rows: list[dict]) -> dict:
        key = tuple(r["id"] for r in rows)
        return self.cache[key] if key in self.cache else self.inner(rows)


def part_sizes(cfg) -> tuple[int, int, int]:
    """Parameters of the vision tower, the projector and the text model without its embedding, counted on
    a copy of the model built on the meta device (nothing allocated; a 4-bit model's packed weights would
    count half)."""
    from transformers import Gemma3ForConditionalGeneration

    with torch.device("meta"):
        m = Gemma3ForConditionalGeneration(cfg).model
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    return (count(m.vision_tower), count(m.multi_modal_projector),
            count(m.language_model) - count(m.language_model.embed_tokens))


def model_flops(cfg, sizes: tuple[int, int, int], batch: dict, loss_tokens: int) -> float:
    """Model FLOPs of one training pass over `batch` (formula in the module docstring); `sizes`: `part_sizes`."""
    t, v = cfg.text_config, cfg.vision_config
    n_vis, n_proj, n_text = sizes
    patches = (v.image_size // v.patch_size) ** 2
    images = int(batch["pixel_values"].shape[0])
    lengths = batch["attention_mask"].sum(1).tolist()
    dense = 6 * (images * (n_vis * patches + n_proj * cfg.mm_tokens_per_image) + n_text * sum(lengths)
                 + t.hidden_size * t.vocab_size * loss_tokens)
    attn = 12 * (images * v.num_hidden_layers * patches ** 2 * v.hidden_size
                 + sum(t.num_hidden_layers * n ** 2 * t.num_attention_heads * t.head_dim for n in lengths))
    return float(dense + attn)


def run_recipe(path: str, recs: list[dict], steps: int, warmup: int, device) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoProcessor, BitsAndBytesConfig, Gemma3ForConditionalGeneration

    from pipeline.collate import Collator

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = Gemma3ForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", quantization_config=q,
        device_map={"": device} if device.type == "cuda" else None)
    processor = AutoProcessor.from_pretrained(path)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             modules_to_save=["lm_head", "embed_tokens"], task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    collate = Collator(processor, 1024)
    image, pad, boi = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<pad>", "<start_of_image>"))
    batches = []
    for i in range(4 * (warmup + steps)):  # micro-batch 1
        b = collate([recs[i % len(recs)]])
        labels = b["input_ids"].clone()  # the recipe's collator: every token but pad and image tokens
        labels[(labels == pad) | (labels == image) | (labels == boi)] = -100
        b["labels"] = labels
        batches.append({k: b[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids", "labels",
                                                      "pixel_values")})
    model.train()

    def step(s: int) -> None:
        for micro in range(4):  # accumulation 4
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                out = model(**batches[s * 4 + micro])
            (out.loss / 4).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    cfg = model.get_base_model().config
    sizes = part_sizes(cfg)
    flops = sum(model_flops(cfg, sizes, b, int((b["labels"][:, 1:] != -100).sum())) for b in batches[:4])
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[:4])
    return {**timed(step, steps, warmup), "flops_per_step": flops, "tokens_per_step": tokens}


def run_ours(arm: str, path: str, recs: list[dict], steps: int, warmup: int, device) -> dict:
    from pipeline import config, train

    params = config.load(ROOT / "params.yaml", [f"model.base={path}", *overrides_of(arm)])
    t = params.train
    state = train.setup(params, recs, [])
    per_step = t.batch_size * t.grad_accum
    order = [[recs[(s * per_step + j) % len(recs)] for j in range(per_step)] for s in range(warmup + steps)]
    micro = [step_rows[i : i + t.batch_size] for step_rows in order for i in range(0, per_step, t.batch_size)]
    state.collator = Precollated(state.collator, micro)
    cfg = state.model.get_base_model().config

    def step(s: int) -> None:
        rows = order[s]
        train.train_step(state, [rows[i : i + t.batch_size] for i in range(0, per_step, t.batch_size)], t)

    first = [state.collator(m) for m in micro[: per_step // t.batch_size]]
    sizes = part_sizes(cfg)
    flops = sum(model_flops(cfg, sizes, b, int((b["labels"][:, 1:] != -100).sum())) for b in first)
    tokens = sum(int(b["attention_mask"].sum()) for b in first)
    return {**timed(step, steps, warmup), "flops_per_step": flops, "tokens_per_step": tokens,
            "overrides": overrides_of(arm)}


def timed(step, steps: int, warmup: int) -> dict:
    """Run `step(i)` warmup + steps times; mean seconds per timed step (4 samples a step)."""
    times = []
    for s in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        step(s)
        _sync()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return {"step_s": sum(times) / len(times), "samples_per_s": 4 * len(times) / sum(times)}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def child(arm: str, path: str, data: str, steps: int, warmup: int) -> None:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    recs = json.loads(Path(data).read_text())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    r = run_recipe(path, recs, steps, warmup, device) if arm == "recipe" else run_ours(arm, path, recs, steps, warmup, device)
    from pipeline.model import peak_memory

    mem = peak_memory()
    r["peak_gib"] = mem.get("peak_gpu_gib")  # the GPU's allocations; on the CPU smoke test: none
    r["peak_rss_gib"] = mem["peak_rss_gib"]
    r["tokens_per_s"] = r["tokens_per_step"] / r["step_s"]
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--arms", default=",".join(n for n, _ in ARMS))
    ap.add_argument("--tiny", action="store_true", help="the tiny stand-in, for a CPU smoke test of this script")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by name)")
    ap.add_argument("--child")
    ap.add_argument("--path")
    ap.add_argument("--data")
    ap.add_argument("--out", default=None, help="default: bench/results/gpu_train.json (--tiny: gpu_train_smoke.json)")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.path, args.data, args.steps, args.warmup)
    from pipeline import base, config, standin

    arms = args.arms.split(",")
    unknown = set(arms) - {n for n, _ in ARMS}
    if unknown:
        sys.exit(f"--arms: unknown {sorted(unknown)} (one of {[n for n, _ in ARMS]})")
    shape = "gemma-3-tiny" if args.tiny else "gemma-3-4b"
    results, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        params = config.load(ROOT / "params.yaml")
        built = standin.write(shape, Path(tmp) / "model", base.corpus(params, []))
        data = Path(tmp) / "records.json"
        data.write_text(json.dumps(records(Path(tmp) / "images", 32)))
        for arm in arms:
            cmd = [sys.executable, __file__, "--child", arm, "--path", str(Path(tmp) / "model"), "--data", str(data),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            results[arm] = json.loads(line[0][7:]) if line else {"error": out.stderr[-3000:]}
            print(arm, {k: v for k, v in results[arm].items() if k != "overrides"}, flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
    peak = peak_tflops(device, args.peak_tflops)
    for r in results.values():
        if "error" not in r:
            r["mfu"] = r["flops_per_step"] / r["step_s"] / (peak * 1e12) if peak else None
    print(f"\n{device}; {built['parameters'] / 1e9:.2f} B parameters ({shape}); effective batch 4; "
          f"bf16 peak {peak} TFLOPS")
    print(f"{'arm':<14}{'samples/s':>10}{'tokens/s':>10}{'peak GiB':>10}{'MFU':>8}")
    for arm, r in results.items():
        if "error" not in r:
            gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"{arm:<14}{r['samples_per_s']:>10.2f}{r['tokens_per_s']:>10.0f}{gib:>10}{mfu:>8}")
    summary = {}
    rec = results.get("recipe", {})
    for arm, r in results.items():
        if arm != "recipe" and "error" not in r and "error" not in rec and rec:
            summary[arm] = {"speed_vs_recipe": r["samples_per_s"] / rec["samples_per_s"],
                            "memory_vs_recipe": (r["peak_gib"] / rec["peak_gib"]) if r["peak_gib"] else None}
    for arm, s in summary.items():
        mem = f"{s['memory_vs_recipe']:.0%}" if s["memory_vs_recipe"] is not None else "-"
        print(f"{arm} / recipe: {s['speed_vs_recipe']:.2f}x samples/s (target >= 3), {mem} of peak memory (target <= 50%)")
    out = Path(args.out or ROOT / "bench/results" / ("gpu_train_smoke.json" if args.tiny else "gpu_train.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python bench/gpu_train.py " + " ".join(sys.argv[1:]), "device": device, "machine": platform.platform(),
        "shape": shape, "parameters": built["parameters"], "peak_tflops": peak, "arms": [n for n, _ in ARMS if n in arms],
        "minutes": round((time.perf_counter() - start) / 60, 1), "results": results, "vs_recipe": summary}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
