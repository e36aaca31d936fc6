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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from pipeline import chat, config, data as dataio, model as modelmod, standin
from pipeline.collate import Collator
from pipeline.errors import InputError
from pipeline.model import answer_ce, to_device
from pipeline.optim import schedule

# The base's own visual vocabulary: generic words, its own palette (each colour jittered per shape).
PALETTE = {"red": (200, 40, 45), "orange": (235, 130, 30), "yellow": (235, 210, 50), "green": (60, 150, 70),
           "teal": (40, 140, 140), "blue": (50, 90, 200), "purple": (120, 60, 160), "pink": (230, 130, 170),
           "brown": (120, 80, 45), "grey": (128, 128, 128), "white": (245, 245, 240), "black": (20, 20, 25)}
GROUNDS = {"pale": (215, 212, 205), "dark": (55, 55, 60), "beige": (200, 180, 150), "sky-blue": (160, 190, 220),
           "olive": (120, 125, 80)}
SHAPES = ("circle", "square", "triangle", "ring", "star", "cross", "bar", "blob")  # the default `base.shapes`
LINES = ("line", "wavy line", "zigzag line", "branching line")  # drawn as strokes: thin or thick, no texture
TEXTURES = ("plain", "dotted", "striped", "mottled", "speckled")
SIZES = {"small": 0.09, "medium": 0.15, "large": 0.23}
PLACES = {"top left": (0.28, 0.28), "top": (0.5, 0.25), "top right": (0.72, 0.28), "left": (0.25, 0.5),
          "centre": (0.5, 0.5), "right": (0.75, 0.5), "bottom left": (0.28, 0.72), "bottom": (0.5, 0.75),
          "bottom right": (0.72, 0.72)}
COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six")
PROMPT = "Describe the image."
TOWER = "model.vision_tower."  # the SigLIP tower's parameter names (the projector is not in it)
TOKENIZER_SEED = 0  # the tokenizer's corpus does not move with base.seed: a re-pre-trained base keeps its config


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    place: str
    texture: str
    blurred: bool
    symmetric: bool
    thick: bool = False  # lines only


def check_shapes(shapes: tuple[str, ...]) -> tuple[str, ...]:
    """`base.shapes` as given, or an error naming what is not a shape or line of the scenes."""
    unknown = [s for s in shapes if s not in SHAPES + LINES]
    if unknown or not shapes:
        raise InputError(f"base.shapes: unknown {unknown or 'empty list'} (choose from {list(SHAPES + LINES)})")
    return shapes


def plan_scene(rng: np.random.Generator, shapes: tuple[str, ...] = SHAPES) -> tuple[str, str, list[Thing], int, str]:
    """What one scene shows: ground, ground texture, 1-3 things at distinct places, and 0-6 scattered
    marks of one colour (counted). Pixels are drawn from this plan by `render_scene`."""
    ground = list(GROUNDS)[int(rng.integers(len(GROUNDS)))]
    ground_texture = ("plain", "mottled", "speckled")[int(rng.integers(3))]
    places = rng.choice(len(PLACES), size=int(rng.integers(1, 4)), replace=False)
    things = []
    for k in places:
        shape = shapes[int(rng.integers(len(shapes)))]
        thing = Thing(shape=shape, colour=list(PALETTE)[int(rng.integers(len(PALETTE)))],
                      size=list(SIZES)[int(rng.integers(len(SIZES)))], place=list(PLACES)[int(k)],
                      texture=TEXTURES[int(rng.integers(len(TEXTURES)))], blurred=bool(rng.integers(2)),
                      symmetric=shape != "blob" or bool(rng.integers(2)))
        if shape in LINES:  # a stroke: plain and sharp, thin or thick (the draws above keep the shapes' order)
            thing = replace(thing, texture="plain", blurred=False, symmetric=True, thick=bool(rng.integers(2)))
        things.append(thing)
    marks = int(rng.integers(0, 7)) if rng.random() < 0.5 else 0
    mark_colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
    return ground, ground_texture, things, marks, mark_colour


def describe(ground: str, ground_texture: str, things: list[Thing], marks: int, mark_colour: str) -> str:
    """The scene's caption, generic English: what, where, how big, its colour, texture and border."""
    parts = []
    for t in things:
        if t.shape in LINES:
            parts.append(f"a {t.size} {'thick' if t.thick else 'thin'} {t.colour} {t.shape} at the {t.place}")
            continue
        texture = "" if t.texture == "plain" else f"{t.texture} "
        shape = t.shape if t.shape != "blob" else ("symmetric blob" if t.symmetric else "irregular blob")
        border = "blurred" if t.blurred else "sharp"
        parts.append(f"a {t.size} {texture}{t.colour} {shape} with a {border} border at the {t.place}")
    n = len(things)
    text = f"{COUNT_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: " + "; ".join(parts) + "."
    ground_words = f"a {ground} background" if ground_texture == "plain" else f"a {ground_texture} {ground} background"
    text += f" {'They lie' if n > 1 else 'It lies'} on {ground_words}."
    if marks:
        text += f" {COUNT_WORDS[marks].capitalize()} small {mark_colour} mark{'s' if marks > 1 else ''} scattered around."
    return text


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 18) -> np.ndarray:
    return np.clip(np.array(rgb, np.float32) + rng.normal(0, amount, 3), 0, 255) / 255


def _texture(rng: np.random.Generator, colour: np.ndarray, kind: str, size: int) -> np.ndarray:
    """(size, size, 3) fill in [0, 1]: plain, dotted (a lattice of darker dots), striped (bands at an
    angle), mottled (low-frequency light and dark patches), speckled (fine random grains)."""
    out = np.broadcast_to(colour, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    other = np.where(colour.mean() > 0.5, colour * 0.45, np.minimum(colour + 0.45, 1))
    if kind == "dotted":
        period = rng.uniform(0.07, 0.11)
        fx, fy = (xx / period) % 1 - 0.5, (yy / period) % 1 - 0.5
        mask = (fx ** 2 + fy ** 2) < 0.07
        out[mask] = other
    elif kind == "striped":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.14)
        mask = ((xx * np.cos(angle) + yy * np.sin(angle)) / period) % 1 < 0.45
        out[mask] = other
    elif kind == "mottled":
        coarse = rng.uniform(-1, 1, (5, 5)).astype(np.float32)
        noise = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC), np.float32)
        out = np.clip(out * (1 + 0.35 * noise[..., None]), 0, 1)
    elif kind == "speckled":
        mask = rng.random((size, size)) < 0.18
        out[mask] = other
    return out


def _stroke(rng: np.random.Generator, t: Thing, r: float, cx: float, cy: float, draw: ImageDraw.ImageDraw,
            size: int) -> None:
    """A line of half-length `r` through (cx, cy) at a random angle: straight, wavy (a sine across it),
    zigzag (alternate corners) or branching (a straight stem with one side branch)."""
    a = rng.uniform(0, np.pi)
    along, across = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    u = np.linspace(-1, 1, 24)
    if t.shape == "wavy line":
        off = 0.18 * np.sin(u * np.pi * rng.uniform(1.5, 2.5) + rng.uniform(0, 6.3))
    elif t.shape == "zigzag line":
        u = np.linspace(-1, 1, 7)
        off = 0.15 * np.where(np.arange(7) % 2 == 0, 1.0, -1.0)
    else:
        off = np.zeros_like(u)
    pts = [(cx + r * (p * along[0] + q * across[0]), cy + r * (p * along[1] + q * across[1])) for p, q in zip(u, off)]
    width = max(1, round(size * (0.045 if t.thick else 0.02)))
    draw.line(pts, fill=255, width=width)
    if t.shape == "branching line":  # a side branch from a point of the stem, at 40-60 degrees
        bx, by = pts[int(rng.integers(8, 16))]
        b = a + rng.choice([-1, 1]) * rng.uniform(0.7, 1.05)
        draw.line((bx, by, bx + 0.6 * r * np.cos(b), by + 0.6 * r * np.sin(b)), fill=255, width=width)


def _shape_mask(rng: np.random.Generator, t: Thing, size: int) -> Image.Image:
    r = size * SIZES[t.size] * rng.uniform(0.9, 1.1)
    cx, cy = (np.array(PLACES[t.place]) + rng.uniform(-0.03, 0.03, 2)) * size
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if t.shape in LINES:
        _stroke(rng, t, r * 1.3, cx, cy, draw, size)
        return mask
    box = (cx - r, cy - r, cx + r, cy + r)
    if t.shape == "circle":
        draw.ellipse(box, fill=255)
    elif t.shape == "square":
        draw.rectangle(box, fill=255)
    elif t.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
    elif t.shape == "ring":
        draw.ellipse(box, outline=255, width=max(2, int(r / 3)))
    elif t.shape == "star":
        pts = [(cx + (r if i % 2 == 0 else r * 0.45) * np.sin(np.pi * i / 5),
                cy - (r if i % 2 == 0 else r * 0.45) * np.cos(np.pi * i / 5)) for i in range(10)]
        draw.polygon(pts, fill=255)
    elif t.shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=255)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=255)
    elif t.shape == "bar":
        draw.rectangle((cx - r * 1.3, cy - r * 0.35, cx + r * 1.3, cy + r * 0.35), fill=255)
    else:  # blob: a smooth closed curve; irregular = odd harmonics (no axis of symmetry)
        theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        radius = 1 + rng.uniform(0.05, 0.15) * np.cos(2 * theta)
        if not t.symmetric:
            radius += rng.uniform(0.2, 0.3) * np.cos(theta + rng.uniform(0, 6.3)) \
                + rng.uniform(0.1, 0.2) * np.sin(3 * theta + rng.uniform(0, 6.3))
        draw.polygon([(cx + r * q * np.cos(a), cy + r * q * np.sin(a)) for q, a in zip(radius, theta)], fill=255)
    if t.blurred:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=max(1.0, r / 6)))
    return mask


def render_scene(rng: np.random.Generator, plan: tuple, size: int) -> Image.Image:
    """The pixels of a planned scene: textured, jittered colours, shapes alpha-composited in order."""
    ground, ground_texture, things, marks, mark_colour = plan
    colour = _jitter(rng, GROUNDS[ground], 10)
    img = 0.6 * colour + 0.4 * _texture(rng, colour, ground_texture, size)  # a ground's texture is faint
    for t in things:
        alpha = np.asarray(_shape_mask(rng, t, size), np.float32)[..., None] / 255
        fill = _texture(rng, _jitter(rng, PALETTE[t.colour]), t.texture, size)
        img = img * (1 - alpha) + fill * alpha
    if marks:
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        for _ in range(marks):
            x, y, r = rng.uniform(0.08, 0.92) * size, rng.uniform(0.08, 0.92) * size, max(1.0, size * 0.025)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        alpha = np.asarray(mask, np.float32)[..., None] / 255
        img = img * (1 - alpha) + _jitter(rng, PALETTE[mark_colour], 10) * alpha
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def draw_scene(rng: np.random.Generator, size: int, shapes: tuple[str, ...] = SHAPES) -> tuple[Image.Image, str]:
    """One generic image and its caption. The plan (and so the caption) comes from `rng` alone; the
    pixels from a child generator, so a caption does not depend on the image size."""
    plan = plan_scene(rng, shapes)
    pixels = np.random.default_rng(rng.integers(2 ** 63))
    return render_scene(pixels, plan, size), describe(*plan)


def generic_samples(n: int, seed: int, size: int, system_prompt: str, shapes: tuple[str, ...] = SHAPES) -> list[dict]:
    rng = np.random.default_rng([seed, 99])
    out = []
    for i in range(n):
        img, caption = draw_scene(rng, size, shapes)
        out.append({"id": f"scene-{i:05d}", "image": img, "messages": chat.messages(caption, PROMPT, system_prompt)})
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
    generic = generic_samples(params.base.images, TOKENIZER_SEED, 8, params.data.system_prompt, params.base.shapes)
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


def tower_groups(model, cfg: config.Base) -> list[dict]:
    """Optimizer groups: the vision tower at `cfg.vision_lr`, everything else (projector, language model) at
    `cfg.lr`. Why: the captions reward colour first, and at the full rate the tower's patch embedding comes
    to be dominated by each patch's mean colour, which LoRA on a frozen tower hardly undoes; a domain of
    fine structure may want it slower (README, *base*). `vision_lr: 0` freezes it."""
    if cfg.vision_lr == cfg.lr:  # one group, in the model's order: the same steps as before the param existed
        return [{"params": list(model.parameters()), "lr": cfg.lr}]
    tower, rest = [], []
    for n, p in model.named_parameters():
        (tower if n.startswith(TOWER) else rest).append(p)
    for p in tower:
        p.requires_grad_(cfg.vision_lr > 0)
    return [{"params": rest, "lr": cfg.lr}] + ([{"params": tower, "lr": cfg.vision_lr}] if cfg.vision_lr > 0 else [])


def pretrain(model, processor, samples: list[dict], cfg: config.Base,
             text: list[tuple[list[int], list[int]]] = (), text_history: list[float] | None = None) -> list[float]:
    """Full-parameter causal-LM training on the answers (image-caption batches, plus text-only batches
    of `text` when given); returns the per-step loss of the image-caption batches."""
    collator = Collator(processor, max_length=512)
    opt = torch.optim.AdamW(tower_groups(model, cfg), weight_decay=0.01)
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
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
    return history


def main(params: config.Params, shape: str | None = None, out: str | None = None) -> dict:
    """Build, pre-train and save the built-in base to `paths.models/base` (atomically); with `shape`,
    write a randomly initialised stand-in of that real size to `out` instead (`pipeline.standin`)."""
    if shape is not None:
        return write_standin(params, shape, Path(out) if out else Path(params.paths.models) / f"standin-{shape}")
    if out is not None:
        raise InputError("base: --out goes with --shape (the built-in base is written to paths.models/base)")
    if params.model.base != modelmod.BUILTIN:
        return {"skipped": f"model.base is {params.model.base!r}: loaded as is by train"}
    torch.manual_seed(params.base.seed)
    samples = generic_samples(params.base.images, params.base.seed, params.model.image_size, params.data.system_prompt,
                              check_shapes(params.base.shapes))
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


def write_standin(params: config.Params, shape: str, out: Path) -> dict:
    """A stand-in checkpoint of `shape` at `out` (atomically). Its tokenizer learns its pieces from the
    base's corpus (generic captions, the training split's captions when a split exists, the prompts)."""
    standin.shape_of(shape)  # an unknown shape fails before any work
    if out.exists() and any(out.iterdir()):
        raise InputError(f"base --out: {out} exists and is not empty; give a new folder")
    with dataio.atomic_dir(out) as tmp:
        summary = standin.write(shape, tmp, corpus(params, domain_captions(params)), seed=params.base.seed)
    return {**summary, "out": str(out)}
