"""Attention that is right: `model.attn_implementation` sdpa gives eager's logits, and in both an image's
tokens see each other in both directions (Gemma 3's bidirectional image block), while text stays causal."""
import pytest
import torch

from pipeline import model as modelmod
from pipeline.collate import open_image


def _inputs(processor, records):
    processor.tokenizer.padding_side = "left"
    prompts = [processor.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"], tokenize=False,
                                             add_generation_prompt=True) for r in records]
    return processor(text=prompts, images=[[open_image(r["image"])] for r in records], return_tensors="pt",
                     padding=True, add_special_tokens=False)


def _last_hidden(model, enc, delta_on_last_image_token: float = 0.0):
    """Last-layer hidden states; optionally with the last image token's projected features shifted."""
    def shift(_module, _inputs, out):
        out = out.clone()
        out[:, -1, :] += delta_on_last_image_token
        return out

    hook = model.model.multi_modal_projector.register_forward_hook(shift) if delta_on_last_image_token else None
    try:
        with torch.no_grad():
            return model(**enc, output_hidden_states=True).hidden_states[-1]
    finally:
        if hook:
            hook.remove()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_image_tokens_see_later_image_tokens_and_text_stays_causal(base_dir, records, impl):
    model, processor = modelmod.load(str(base_dir), attn_implementation=impl)
    model.eval()
    enc = _inputs(processor, records[:1])
    image = (enc["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    first, last = int(image[0]), int(image[-1])
    plain, shifted = _last_hidden(model, enc), _last_hidden(model, enc, 5.0)
    # the first image token changes when the last one does: it attends forward within the image
    assert (shifted[0, first] - plain[0, first]).abs().max() > 1e-3, impl
    # the token just before the image cannot see it (causal text), nor can any earlier token
    assert torch.allclose(shifted[0, :first], plain[0, :first], atol=1e-6), impl
    assert (shifted[0, last + 1 :] - plain[0, last + 1 :]).abs().max() > 1e-3  # later text reads the image


def test_sdpa_gives_the_eager_logits(base_dir, records):
    eager, processor = modelmod.load(str(base_dir), attn_implementation="eager")
    sdpa, _ = modelmod.load(str(base_dir), attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    enc = _inputs(processor, records[:4])  # padded batch: the padding mask and the image block together
    with torch.no_grad():
        a, b = eager.eval()(**enc).logits, sdpa.eval()(**enc).logits
    keep = enc["attention_mask"].bool()
    assert torch.allclose(a[keep], b[keep], atol=1e-4), (a[keep] - b[keep]).abs().max()
