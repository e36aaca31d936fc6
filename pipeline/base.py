"""`base`: the built-in tiny Gemma 3, built and briefly pre-trained as a stand-in for a foundation model.

No pretrained weights can be downloaded here, so the built-in model first learns generic image-text
grounding on procedurally drawn shapes ("a large red circle and a small black square on a light
background"): colour and shape words tied to pixels. It never sees a dataset's images. The tokenizer is
trained on those captions, on the captions of the dataset's *training* split and on the prompts; the
language model also reads those training captions text-only (in the chat format, with no image), as a
foundation model has read its field's literature before it is fine-tuned on images. Validation and test
captions are never read. A Hugging Face id in `model.base` skips this stage.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline import chat, config, data as dataio, model as modelmod
from pipeline.collate import Collator
from pipeline.model import answer_ce, to_device
from pipeline.optim import schedule

SHAPE_COLOURS = {"white": (236, 234, 228), "red": (184, 58, 60), "light brown": (176, 122, 80),
                 "dark brown": (96, 56, 34), "blue-grey": (104, 120, 142), "black": (28, 24, 24)}
SHAPES = ("circle", "square", "triangle", "ring")
BACKGROUNDS = {"light": (225, 200, 180), "dark": (110, 80, 60)}
PROMPT = "Describe the image."
TOKENIZER_SEED = 0  # the tokenizer's corpus does not move with base.seed: a re-pre-trained base keeps its config


def draw_shapes(rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """One generic image and its caption: 1-2 coloured shapes of two sizes on a light or dark ground."""
    bg = list(BACKGROUNDS)[int(rng.integers(2))]
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    parts = []
    for k in range(int(rng.integers(1, 3))):
        colour = list(SHAPE_COLOURS)[int(rng.integers(len(SHAPE_COLOURS)))]
        shape, big = SHAPES[int(rng.integers(len(SHAPES)))], bool(rng.integers(2))
        r = size * (0.22 if big else 0.11)
        cx = size * (0.3 + 0.4 * k) + rng.uniform(-3, 3)
        cy = size * 0.5 + rng.uniform(-size * 0.2, size * 0.2)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = SHAPE_COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
        parts.append(f"a {'large' if big else 'small'} {colour} {shape}")
    caption = f"{' and '.join(parts).capitalize()} on a {bg} background."
    return img, caption


def generic_samples(n: int, seed: int, size: int, system_prompt: str) -> list[dict]:
    rng = np.random.default_rng([seed, 99])
    out = []
    for i in range(n):
        img, caption = draw_shapes(rng, size)
        out.append({"id": f"shape-{i:05d}", "image": img, "messages": chat.messages(caption, PROMPT, system_prompt)})
    return out


def domain_captions(params: config.Params) -> list[str]:
    """The distinct captions of `base.captions` (the training split, or the copy `ingest` froze; at most
    `base.corpus_captions`, in a fixed order); none before a split exists. Never val or test."""
    train = Path(params.base.captions)
    if not train.is_file():
        return []
    captions = sorted({chat.answer(r["messages"]).strip() for r in dataio.read_jsonl(train)})
    order = np.random.default_rng([TOKENIZER_SEED, 7]).permutation(len(captions))
    return [captions[i] for i in order[: params.base.corpus_captions]]


def corpus(params: config.Params, domain: list[str]) -> list[str]:
    """Text for the tokenizer: generic captions (drawn with TOKENIZER_SEED, on 8-px images: only the
    words matter), the training split's captions, the prompts."""
    generic = generic_samples(params.base.images, TOKENIZER_SEED, 8, params.data.system_prompt)
    prompts = [params.data.prompt, params.data.system_prompt, PROMPT]
    return [chat.answer(s["messages"]) for s in generic] + domain + prompts * 20


def text_only(processor, captions: list[str], prompt: str, system_prompt: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of chat samples with no image: the answer is the caption, the rest is -100."""
    out = []
    for caption in captions:
        msgs = [m if m["role"] != "user" else {**m, "content": [c for c in m["content"] if c["type"] != "image"]}
                for m in chat.messages(caption, prompt, system_prompt)]
        full = processor.apply_chat_template(msgs, tokenize=False)
        prefix = processor.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        tok = processor.tokenizer
        ids = tok(full, add_special_tokens=False)["input_ids"]
        n = len(tok(prefix, add_special_tokens=False)["input_ids"])
        out.append((ids, [-100] * n + ids[n:]))
    return out


def text_batch(rows: list[tuple[list[int], list[int]]], pad: int, device) -> dict:
    width = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows], device=device)
    labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows], device=device)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pretrain(model, processor, samples: list[dict], cfg: config.Base,
             text: list[tuple[list[int], list[int]]] = (), text_history: list[float] | None = None) -> list[float]:
    """Full-parameter causal-LM training on the answers (image-caption batches, plus text-only batches
    of `text` when given); returns the per-step loss of the image-caption batches."""
    collator = Collator(processor, max_length=512)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(max(1, cfg.steps // 10), cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    history = []
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(samples), (cfg.batch_size,), generator=gen).tolist()
        batch = to_device(collator([samples[i] for i in idx]), next(model.parameters()).device)
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"], pixel_values=batch["pixel_values"])
        loss = answer_ce(model, out.last_hidden_state, batch["labels"])
        history.append(loss.item())
        if text and cfg.text_batch_size:
            rows = [text[i] for i in torch.randint(0, len(text), (cfg.text_batch_size,), generator=gen).tolist()]
            tb = text_batch(rows, processor.tokenizer.pad_token_id, batch["input_ids"].device)
            hidden = model.model.language_model(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"])
            text_loss = answer_ce(model, hidden.last_hidden_state, tb["labels"])
            if text_history is not None:
                text_history.append(text_loss.item())
            loss = loss + text_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return history


def main(params: config.Params) -> dict:
    """Build, pre-train and save the built-in base to `paths.models/base` (atomically)."""
    if params.model.base != modelmod.BUILTIN:
        return {"skipped": f"model.base is {params.model.base!r}: loaded as is by train"}
    torch.manual_seed(params.base.seed)
    samples = generic_samples(params.base.images, params.base.seed, params.model.image_size, params.data.system_prompt)
    domain = domain_captions(params)
    model, processor = modelmod.build_builtin(params.model, corpus(params, domain), params.base.seed)
    start = time.perf_counter()
    text = text_only(processor, domain, params.data.prompt, params.data.system_prompt)
    text_history: list[float] = []
    history = pretrain(model, processor, samples, params.base, text, text_history)
    with dataio.atomic_dir(Path(params.paths.models) / "base") as out:
        model.save_pretrained(out)
        processor.save_pretrained(out)
        summary = {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(processor.tokenizer),
                   "steps": len(history), "loss_first": history[0], "loss_last": float(np.mean(history[-10:])),
                   "text_loss_first": text_history[0] if text_history else None,
                   "text_loss_last": float(np.mean(text_history[-10:])) if text_history else None,
                   "seconds": round(time.perf_counter() - start, 1)}
        summary["weights_sha256"] = modelmod.store_weights_sha256(out)
        summary["domain_captions"] = len(domain)
        dataio.write_json(out / "pretrain.json", summary)
    return summary
