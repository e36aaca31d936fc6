"""GPU benchmark: QLoRA training of a model with Gemma 3 4B's shapes (random weights, no download).

Compares, at the same effective batch of 4 samples (256 image tokens + ~100 text tokens each):
  recipe  the published Gemma 3 QLoRA recipe: NF4 + double quantisation, LoRA r=16 all-linear,
          full training of `embed_tokens` and `lm_head` (modules_to_save), micro-batch 1 x
          accumulation 4, gradient checkpointing, loss over every non-pad non-image token with the
          full (B, T, 262k) logits;
  ours    our trainer: NF4 + double quantisation with the vision tower and projector kept in bf16,
          LoRA r=16 all-linear, no embedding training, micro-batch 4, the three-part loss, gradient
          checkpointing on the vision tower only, logits only for the answer tokens.
Each runs in its own process (its own peak memory). Prints a table: samples/s, peak GiB, ratios.
Target: ours >= 3x the recipe's samples/s at <= 50 % of its peak memory.

    python bench/gpu_train.py [--steps 6] [--warmup 2]        # on one GPU, about 5 minutes
    python bench/gpu_train.py --tiny                          # smoke test of the code on the CPU

The GPU image lacks bitsandbytes: carry its wheel (see README, "GPU benchmark").
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_TOKEN, BOI, EOI, BOS, EOT, PAD = 262_144, 255_999, 256_000, 2, 106, 0


def gemma3_4b_config(tiny: bool):
    """Gemma 3 4B's architecture (or a tiny stand-in for a CPU smoke test)."""
    from transformers import Gemma3Config

    if tiny:
        text = dict(vocab_size=262_208, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=224, patch_size=14)
    else:
        text = dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                    sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0})
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=896, patch_size=14, vision_use_head=False)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256, boi_token_index=BOI,
                        eoi_token_index=EOI, image_token_index=IMAGE_TOKEN, pad_token_id=PAD, bos_token_id=BOS)


def sample(gen: torch.Generator, answer_len: int = 64) -> tuple[list[int], int]:
    """A chat-shaped sequence: prompt, image span of 256 soft tokens, prompt, answer; -> (ids, answer start)."""
    words = lambda n: torch.randint(1000, 200_000, (n,), generator=gen).tolist()  # noqa: E731
    prompt = [BOS, 105] + words(20) + [BOI] + [IMAGE_TOKEN] * 256 + [EOI] + words(16) + [EOT, 105] + words(2)
    return prompt + words(answer_len) + [EOT], len(prompt)


def batch(n: int, device, dtype, image_size: int, seed: int, recipe: bool) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows = [sample(gen) for _ in range(n)]
    width = max(len(r) for r, _ in rows)
    ids = torch.full((n, width), PAD)
    labels = torch.full((n, width), -100)
    for i, (r, start) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        if recipe:  # the recipe's collator: everything but pad and image tokens
            labels[i, : len(r)] = torch.tensor(r)
            labels[i][(ids[i] == IMAGE_TOKEN) | (ids[i] == BOI)] = -100
        else:
            labels[i, start : len(r)] = ids[i, start : len(r)]
    out = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "token_type_ids": (ids == IMAGE_TOKEN).long(),
           "labels": labels, "pixel_values": torch.randn(n, 3, image_size, image_size, generator=gen).to(dtype)}
    out = {k: v.to(device) for k, v in out.items()}
    answers = [r[start:] for r, start in rows]
    out["caption_ids"] = torch.tensor([[BOS] + a for a in answers], device=device)
    out["caption_attention"] = torch.ones_like(out["caption_ids"])
    out["caption_mask"] = out["caption_attention"].clone()
    out["caption_mask"][:, 0] = 0
    out["captions"] = [" ".join(map(str, a)) for a in answers]
    return out


def load_quantized(path: str, keep_vision: bool, dtype):
    from transformers import Gemma3ForConditionalGeneration

    from pipeline.model import nf4_config

    return Gemma3ForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                                          quantization_config=nf4_config(keep_vision, dtype),
                                                          device_map={"": 0} if torch.cuda.is_available() else None)


def run_recipe(path: str, steps: int, warmup: int, device, dtype, image_size: int) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = load_quantized(path, keep_vision=False, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             modules_to_save=["lm_head", "embed_tokens"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()

    def step(s: int) -> None:
        for micro in range(4):  # micro-batch 1 x accumulation 4
            b = batch(1, device, dtype, image_size, seed=s * 4 + micro, recipe=True)
            out = model(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels", "pixel_values")})
            (out.loss / 4).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, warmup)


def run_ours(path: str, steps: int, warmup: int, device, dtype, image_size: int) -> dict:
    from pipeline import losses
    from pipeline.config import Peft
    from pipeline.model import AlignmentHeads, apply_peft
    from pipeline.model import TextAnchor
    from pipeline.train import forward_terms, param_groups
    from pipeline.config import Lr

    model = load_quantized(path, keep_vision=True, dtype=dtype)
    model = apply_peft(model, Peft(method="qlora"))
    vision = model.get_base_model().model.vision_tower
    vision.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hidden = model.get_base_model().config.text_config.hidden_size
    heads = AlignmentHeads(hidden, 256).to(device)
    loss_fn = losses.AlignmentLoss().to(device)
    opt = torch.optim.AdamW(param_groups(model, heads, loss_fn, Lr()))
    anchor = TextAnchor()
    model.train()

    def step(s: int) -> None:
        b = batch(4, device, dtype, image_size, seed=s, recipe=False)  # micro-batch 4
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            terms = forward_terms(model, heads, loss_fn, b, text_grad=False, anchor=anchor)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, warmup)


def timed(step, steps: int, warmup: int) -> dict:
    """Run `step(i)` warmup + steps times; samples/s over the timed steps (4 samples a step)."""
    times = []
    for s in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        step(s)
        _sync()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return {"samples_per_s": 4 * len(times) / sum(times), "step_s": sum(times) / len(times)}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def child(variant: str, path: str, steps: int, warmup: int, tiny: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    image_size = 224 if tiny else 896
    fn = run_recipe if variant == "recipe" else run_ours
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    r = fn(path, steps, warmup, device, dtype, image_size)
    r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke test of this script")
    ap.add_argument("--child", choices=["recipe", "ours"])
    ap.add_argument("--path")
    ap.add_argument("--out", default=str(ROOT / "bench/results/gpu_train.json"))
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.path, args.steps, args.warmup, args.tiny)
    from transformers import Gemma3ForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Gemma3ForConditionalGeneration(gemma3_4b_config(args.tiny)).to(dtype)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        results = {}
        for v in ("recipe", "ours"):
            cmd = [sys.executable, __file__, "--child", v, "--path", tmp, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            results[v] = json.loads(line[0][7:]) if line else {"error": out.stderr[-3000:]}
            print(v, results[v], flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
    print(f"\n{device}; {params / 1e9:.2f} B parameters; effective batch 4")
    print(f"{'':8}{'samples/s':>10}{'peak GiB':>10}")
    for v, r in results.items():
        if "error" not in r:
            print(f"{v:<8}{r['samples_per_s']:>10.2f}{r['peak_gib']:>10.1f}")
    if all("error" not in r for r in results.values()):
        speed = results["ours"]["samples_per_s"] / results["recipe"]["samples_per_s"]
        mem = results["ours"]["peak_gib"] / results["recipe"]["peak_gib"]
        print(f"ours / recipe: {speed:.2f}x samples/s (target >= 3), {mem:.0%} of peak memory (target <= 50%)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "parameters": params, "results": results}, indent=2))


if __name__ == "__main__":
    main()
