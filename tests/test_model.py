"""The built-in Gemma 3: a normal checkpoint folder, Google's chat template byte for byte, real tokens."""
import jinja2
import pytest
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

from pipeline import chat, model as modelmod



def google_template():
    """Google's Gemma 3 template as TRL ships it (an outside copy), rendered with plain jinja2."""
    import trl

    path = __import__("pathlib").Path(trl.__file__).parent / "chat_templates" / "gemma3.jinja"
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)  # transformers renders with these
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    return env.from_string(path.read_text())


CONVERSATIONS = [
    chat.messages("A small red circle on a light background.", "Describe the image.", "You are terse."),
    chat.messages("A small red circle on a light background.", "Describe the image."),
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A lesion."}]},
     {"role": "user", "content": [{"type": "text", "text": "  And its border? "}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Abrupt in two segments."}]}],
    [{"role": "system", "content": "Plain string system."}, {"role": "user", "content": "Plain string user."}],
]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_builtin_chat_template_is_byte_identical_to_googles(base_dir, conv, gen):
    proc = AutoProcessor.from_pretrained(base_dir)
    ours = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
    ref = google_template().render(messages=conv, bos_token="<bos>", add_generation_prompt=gen)
    assert ours == ref


def test_rendering_matches_the_design_example(base_dir):
    proc = AutoProcessor.from_pretrained(base_dir)
    text = proc.apply_chat_template(chat.messages("CAP", "PROMPT", "SYS"), tokenize=False)
    assert text == ("<bos><start_of_turn>user\nSYS\n\n<start_of_image>PROMPT<end_of_turn>\n"
                    "<start_of_turn>model\nCAP<end_of_turn>\n")


def test_template_constant_equals_the_outside_copy():
    import trl

    path = __import__("pathlib").Path(trl.__file__).parent / "chat_templates" / "gemma3.jinja"
    assert chat.GEMMA3_CHAT_TEMPLATE == path.read_text()


def test_base_folder_loads_like_a_hub_checkpoint(base_dir):
    proc = AutoProcessor.from_pretrained(base_dir)
    model = Gemma3ForConditionalGeneration.from_pretrained(base_dir)
    assert type(proc).__name__ == "Gemma3Processor"
    cfg = model.config
    assert cfg.text_config.num_hidden_layers == 2 and cfg.text_config.hidden_size == 64
    assert type(model.model.vision_tower).__name__ == "SiglipVisionModel"
    tok = proc.tokenizer
    for t in modelmod.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id or t == "<unk>"
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image_soft_token>")
    assert cfg.boi_token_id == tok.convert_tokens_to_ids("<start_of_image>")


def test_tokenizer_round_trips_any_text(base_dir):
    tok = AutoProcessor.from_pretrained(base_dir).tokenizer
    for text in ["Clinical impression: melanoma.", "café – Ünïcode ✓ 😀", "two  spaces\nand\ttabs"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_processor_expands_the_image_at_its_place(base_dir):
    from PIL import Image

    proc = AutoProcessor.from_pretrained(base_dir)
    text = proc.apply_chat_template(chat.messages("CAP", "PROMPT", "SYS"), tokenize=False)
    enc = proc(text=[text], images=[[Image.new("RGB", (80, 80))]], return_tensors="pt", add_special_tokens=False)
    toks = proc.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    i = toks.index("<start_of_image>")
    assert toks[i + 1 : i + 17] == ["<image_soft_token>"] * 16 and toks[i + 17] == "<end_of_image>"
    assert enc["token_type_ids"][0].sum() == 16
    assert tuple(enc["pixel_values"].shape) == (1, 3, 64, 64)


def test_pretraining_lowered_the_loss(base_dir):
    import json

    summary = json.loads((base_dir / "pretrain.json").read_text())
    # the fixture's 30 steps on long generic-scene captions: 6.9 -> 5.6 (the committed 2,000 steps: -> 1.8)
    assert summary["loss_last"] < 0.85 * summary["loss_first"]


def test_unloadable_base_is_an_input_error(tmp_path):
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="cannot load"):
        modelmod.load(str(tmp_path / "nothing-here"))


def test_one_image_token_per_patch_when_tokens_per_image_fills_the_grid():
    """tokens_per_image = the patch grid (64 = 8 x 8 patches of a 64-px image): the projector pools nothing,
    so changing one patch's vision output changes exactly that patch's image token and no other (with 16
    tokens, 2 x 2 patches are averaged into one token: the same change moves one token, shared by four)."""
    import torch

    from pipeline.config import ModelCfg

    moved = {}
    for tokens in (64, 16):
        model, processor = modelmod.build_builtin(ModelCfg(image_size=64, tokens_per_image=tokens, vocab_size=400),
                                                  ["a red circle on a grey ground"] * 20, seed=0)
        projector = model.model.multi_modal_projector.eval()
        torch.manual_seed(0)
        with torch.no_grad():  # a fresh model's projection starts at zero (HF's init): any weights will do
            projector.mm_input_projection_weight.normal_()
        patches = torch.randn(1, 64, model.config.vision_config.hidden_size)
        changed = patches.clone()
        changed[0, 2 * 8 + 5] += 3.0  # the patch in row 2, column 5 of the 8 x 8 grid
        with torch.no_grad():
            a, b = projector(patches), projector(changed)
        assert a.shape[1] == tokens and processor.image_seq_length == tokens
        moved[tokens] = ((a - b).abs().amax(-1)[0] > 1e-4).nonzero().flatten().tolist()
    assert moved[64] == [2 * 8 + 5]
    assert moved[16] == [1 * 4 + 2]  # row 1, column 2 of the 4 x 4 token grid


@pytest.mark.parametrize("size, tokens, message", [
    (64, 36, r"tokens_per_image 36 does not pool the 8 x 8 patches .* one of \[1, 4, 16, 64\]"),
    (64, 144, r"tokens_per_image 144 does not pool the 8 x 8"),
    (60, 16, r"image_size 60 is not a multiple of model.vision.patch_size 8"),
])
def test_an_impossible_image_grid_is_an_input_error(size, tokens, message):
    from pipeline.config import ModelCfg
    from pipeline.errors import InputError

    with pytest.raises(InputError, match=message):
        modelmod.build_builtin(ModelCfg(image_size=size, tokens_per_image=tokens, vocab_size=400), ["a red circle"] * 5, 0)
