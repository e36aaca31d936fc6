"""Pre-flight audit, the first step of `train`: image tokens, truncation and the label mask, per sample.

"Image features and image tokens do not match" is the most reported failure in VLM fine-tuning, almost
always from truncation cutting the image span. Here every sample is checked before any training:
- the image span is <start_of_image>, exactly `tokens_per_image` soft tokens, <end_of_image>, once;
- the whole conversation fits `max_length` (nothing is ever truncated);
- the tokens that count in the loss decode to exactly the assistant answer plus its <end_of_turn>.
"""
from __future__ import annotations

from pipeline import chat
from pipeline.collate import IGNORE, Collator, labels_of


def check_sample(enc, record: dict, processor, tokens_per_image: int, max_length: int) -> list[str]:
    """The problems of one encoded sample (empty list: fine)."""
    tok = processor.tokenizer
    ids = enc.input_ids
    boi, eoi = tok.convert_tokens_to_ids("<start_of_image>"), tok.convert_tokens_to_ids("<end_of_image>")
    soft = tok.convert_tokens_to_ids("<image_soft_token>")
    problems = []
    if ids.count(boi) != 1 or ids.count(eoi) != 1:
        problems.append(f"expected one image span, found {ids.count(boi)} <start_of_image>")
    else:
        span = ids[ids.index(boi) + 1 : ids.index(eoi)]
        if len(span) != tokens_per_image or set(span) != {soft} or ids.count(soft) != tokens_per_image:
            problems.append(f"image tokens do not match image features: {ids.count(soft)} soft tokens, "
                            f"model produces {tokens_per_image}")
    if len(ids) > max_length:
        problems.append(f"{len(ids)} tokens > max_length {max_length}: the answer would be truncated")
    labels = labels_of(enc)
    kept = [t for t in labels if t != IGNORE]
    answer = chat.answer(record["messages"]).strip()
    if tok.decode(kept) != answer + "<end_of_turn>":
        problems.append(f"label mask keeps {tok.decode(kept)!r}, not the answer + <end_of_turn>")
    if sum(enc.token_type_ids) != tokens_per_image:
        problems.append("token_type_ids do not mark exactly the image soft tokens")
    return problems


def render_example(enc, processor) -> list[dict]:
    """Each token of one sample with its part (template / system+prompt / image / answer) and whether
    it counts in the loss."""
    tok = processor.tokenizer
    special = {tok.convert_tokens_to_ids(t) for t in ("<bos>", "<start_of_turn>", "<end_of_turn>", "<pad>")}
    image_ids = {tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    out = []
    for i, (t, lab) in enumerate(zip(enc.input_ids, labels_of(enc))):
        if enc.answer_start <= i < enc.answer_end:
            part = "answer"
        elif t in image_ids:
            part = "image"
        elif t in special:
            part = "template"
        else:
            part = "prompt"
        out.append({"i": i, "token": tok.convert_ids_to_tokens(t), "part": part, "in_loss": lab != IGNORE})
    return out


def run(records: list[dict], processor, tokens_per_image: int, max_length: int, collator: Collator | None = None) -> dict:
    """Audit every record; the report lists offending ids with their problems and one rendered example.

    Given the training `collator`, the encodings it makes are the ones training reuses.
    """
    collator = collator or Collator(processor, max_length=max_length)
    offending: dict[str, list[str]] = {}
    example = None
    for r in records:
        try:
            enc = collator.encoded(r)
        except (ValueError, OSError) as e:
            offending[r["id"]] = [f"cannot encode: {e}"]
            continue
        problems = check_sample(enc, r, processor, tokens_per_image, max_length)
        if problems:
            offending[r["id"]] = problems
        elif example is None:
            example = {"id": r["id"], "tokens": render_example(enc, processor)}
    lengths = [len(collator.encoded(r).input_ids) for r in records if r["id"] not in offending]
    return {"samples": len(records), "passed": len(records) - len(offending), "offending": offending,
            "max_tokens": max(lengths, default=0), "tokens_per_image": tokens_per_image,
            "max_length": max_length, "example": example}
