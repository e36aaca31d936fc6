"""Turning chat samples into model batches, with the loss on the assistant answer only (docs/design.md §4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pipeline import chat

IGNORE = -100


@dataclass
class Encoded:
    """One sample, tokenised: the ids, where the answer is, and what the audit checks."""

    id: str
    input_ids: list[int]
    token_type_ids: list[int]
    pixel_values: torch.Tensor  # (1, 3, S, S)
    answer_start: int  # first answer token
    answer_end: int  # one past the answer's <end_of_turn>
    caption_ids: list[int]  # <bos> + caption, for the text-only pass


def open_image(image) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.open(Path(image)).convert("RGB")


def encode(record: dict, processor) -> Encoded:
    """Render with the processor's chat template, expand the image, tokenise, locate the answer."""
    msgs = record["messages"]
    prompt_msgs = [m for m in msgs if m["role"] != "assistant"]
    full = processor.apply_chat_template(msgs, tokenize=False)
    prefix = processor.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    if not full.startswith(prefix):
        raise ValueError(f"{record['id']}: the rendered prompt is not a prefix of the conversation")
    img = [[open_image(record["image"])]]
    enc = processor(text=[full], images=img, return_tensors="pt", add_special_tokens=False)
    n_prefix = processor(text=[prefix], images=img, return_tensors="pt", add_special_tokens=False)["input_ids"].shape[1]
    ids = enc["input_ids"][0].tolist()
    tok = processor.tokenizer
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    end = ids.index(eot, n_prefix) + 1 if eot in ids[n_prefix:] else len(ids)
    caption = chat.answer(msgs).strip()
    return Encoded(
        id=record["id"], input_ids=ids, token_type_ids=enc["token_type_ids"][0].tolist(),
        pixel_values=enc["pixel_values"], answer_start=n_prefix, answer_end=end,
        caption_ids=[tok.bos_token_id] + tok(caption, add_special_tokens=False)["input_ids"],
    )


def labels_of(e: Encoded) -> list[int]:
    """-100 everywhere but the answer tokens and their <end_of_turn>."""
    return [t if e.answer_start <= i < e.answer_end else IGNORE for i, t in enumerate(e.input_ids)]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


@dataclass
class Collator:
    """Chat samples -> one batch for `Gemma3ForConditionalGeneration` plus the caption-only pass.

    In: records with `id`, `image` (path or PIL image) and `messages` (system?, user[image, text],
    assistant[text]). Out (B samples, T the longest conversation, Tc the longest caption, S image side):
      pixel_values    (B, 3, S, S) float  processor-made
      input_ids       (B, T) long         right-padded with <pad>; image span expanded to its soft tokens
      attention_mask  (B, T) long         1 on real tokens
      token_type_ids  (B, T) long         1 on image soft tokens (Gemma 3's bidirectional image attention)
      labels          (B, T) long         -100 except the assistant answer and its <end_of_turn>
      caption_ids     (B, Tc) long        <bos> + caption tokens, for the text-only pass
      caption_mask    (B, Tc) long        1 on caption tokens (not <bos>, not pad): what is pooled
      caption_attention (B, Tc) long      1 on <bos> + caption tokens
      captions        list[str]           the answers, to group identical captions
      ids             list[str]
    No sample is ever truncated: one longer than `max_length` raises (the pre-flight audit lists them).
    """

    processor: object
    max_length: int = 256
    cache: dict = field(default_factory=dict)

    def encoded(self, record: dict) -> Encoded:
        key = (record["id"], str(record["image"]) if not isinstance(record["image"], Image.Image) else id(record["image"]),
               chat.answer(record["messages"]))
        if key not in self.cache:
            self.cache[key] = encode(record, self.processor)
        return self.cache[key]

    def __call__(self, records: list[dict]) -> dict:
        enc = [self.encoded(r) for r in records]
        too_long = [e.id for e in enc if len(e.input_ids) > self.max_length]
        if too_long:
            raise ValueError(f"samples longer than train.max_length={self.max_length} (never truncated): {too_long}")
        pad = self.processor.tokenizer.pad_token_id
        cap_mask = [[0] + [1] * (len(e.caption_ids) - 1) for e in enc]
        return {
            "pixel_values": torch.cat([e.pixel_values for e in enc]),
            "input_ids": _pad([e.input_ids for e in enc], pad),
            "attention_mask": _pad([[1] * len(e.input_ids) for e in enc], 0),
            "token_type_ids": _pad([e.token_type_ids for e in enc], 0),
            "labels": _pad([labels_of(e) for e in enc], IGNORE),
            "caption_ids": _pad([e.caption_ids for e in enc], pad),
            "caption_mask": _pad(cap_mask, 0),
            "caption_attention": _pad([[1] * len(e.caption_ids) for e in enc], 0),
            "captions": [chat.answer(r["messages"]).strip() for r in records],
            "ids": [r["id"] for r in records],
        }
