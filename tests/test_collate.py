"""Collator and pre-flight audit: loss on the answer only, image tokens checked, nothing truncated."""

import pytest
import torch
from transformers import AutoProcessor

from pipeline import audit, chat
from pipeline.collate import IGNORE, Collator


@pytest.fixture(scope="module")
def proc(base_dir):
    return AutoProcessor.from_pretrained(base_dir)


def test_labels_are_exactly_the_answer_and_its_end_of_turn(proc, records):
    batch = Collator(proc)(records[:4])
    tok = proc.tokenizer
    for b, r in enumerate(records[:4]):
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        kept = labels != IGNORE
        assert torch.equal(labels[kept], ids[kept])
        assert tok.decode(ids[kept]) == chat.answer(r["messages"]) + "<end_of_turn>"
        positions = kept.nonzero().flatten()
        assert (positions.diff() == 1).all()  # one contiguous span ...
        # ... right after the model turn opens; system, prompt, image, template and pad tokens are all -100
        assert tok.decode(ids[: positions[0]]).endswith("<end_of_turn>\n<start_of_turn>model\n")
        assert tok.convert_ids_to_tokens(int(ids[positions[-1]])) == "<end_of_turn>"


def test_batch_contract_shapes_and_masks(proc, records):
    batch = Collator(proc)(records[:3])
    B, T = batch["input_ids"].shape
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    assert batch["attention_mask"].shape == batch["token_type_ids"].shape == batch["labels"].shape == (B, T)
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE).all() and (batch["input_ids"][pad] == proc.tokenizer.pad_token_id).all()
    assert (batch["token_type_ids"].sum(1) == 16).all()
    soft = batch["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert torch.equal(soft, batch["token_type_ids"].bool())
    assert (batch["caption_mask"][:, 0] == 0).all()  # <bos> is not pooled
    assert batch["captions"][0] == chat.answer(records[0]["messages"])


def test_preflight_passes_clean_samples_and_renders_an_example(proc, records):
    report = audit.run(records[:6], proc, tokens_per_image=16, max_length=256)
    assert report["passed"] == 6 and not report["offending"]
    parts = {t["part"] for t in report["example"]["tokens"]}
    assert parts == {"template", "prompt", "image", "answer"}
    assert all(t["in_loss"] == (t["part"] == "answer") for t in report["example"]["tokens"])


def test_preflight_names_samples_whose_image_tokens_do_not_match(proc, records):
    two_images = dict(records[0], id="two-images")
    two_images["messages"] = [dict(m) for m in records[0]["messages"]]
    two_images["messages"][1] = {"role": "user", "content": [{"type": "text", "text": "no image here"}]}
    report = audit.run([records[1], two_images], proc, tokens_per_image=16, max_length=256)
    assert list(report["offending"]) == ["two-images"]
    report = audit.run([records[1]], proc, tokens_per_image=32, max_length=256)  # model expects 32
    assert "image tokens do not match" in report["offending"][records[1]["id"]][0]


def test_too_long_samples_fail_instead_of_being_truncated(proc, records):
    report = audit.run(records[:2], proc, tokens_per_image=16, max_length=40)
    assert set(report["offending"]) == {r["id"] for r in records[:2]}
    assert "would be truncated" in report["offending"][records[0]["id"]][0]
    with pytest.raises(ValueError, match="never truncated"):
        Collator(proc, max_length=40)(records[:2])
