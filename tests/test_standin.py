"""`base --shape`: a hub-format stand-in of Gemma 3 4B (random weights), checked against the published
config, and run through `train` and `evaluate` by `model.base: DIR` at the tiny shape."""
import dataclasses
import json

import pytest

from pipeline import __main__ as cli, evaluate, standin
from pipeline.base import corpus

from conftest import ROOT, trained_project

# google/gemma-3-4b-it's config.json, preprocessor_config.json and tokenizer (the published numbers);
# the parameter count is the one the hub lists for the checkpoint
PUBLISHED = {
    "text": dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=1024, max_position_embeddings=131_072, hidden_activation="gelu_pytorch_tanh",
                 rms_norm_eps=1e-6, final_logit_softcapping=None, attn_logit_softcapping=None),
    "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=896, patch_size=14, vision_use_head=False),
    "top": dict(mm_tokens_per_image=256, boi_token_index=255_999, eoi_token_index=256_000,
                image_token_index=262_144),
    "parameters": 4_300_079_472,
    "tokenizer": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
                  "<start_of_image>": 255_999, "<end_of_image>": 256_000, "<image_soft_token>": 262_144},
    "tokenizer_size": 262_145,
}


@pytest.fixture(scope="module")
def tok(params):
    return standin.tokenizer(corpus(params, []))


def test_the_4b_standin_has_gemma3_4bs_published_config(tok):
    cfg = standin.config("gemma-3-4b", tok)
    for k, v in PUBLISHED["text"].items():
        assert getattr(cfg.text_config, k) == v, k
    for k, v in PUBLISHED["vision"].items():
        assert getattr(cfg.vision_config, k) == v, k
    for k, v in PUBLISHED["top"].items():
        assert getattr(cfg, k) == v, k
    layers = cfg.text_config.layer_types  # five local (sliding) layers, then one global, repeated
    assert layers == [("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(34)]
    rope = cfg.text_config.rope_parameters
    assert rope["full_attention"]["rope_type"] == "linear" and rope["full_attention"]["factor"] == 8.0
    assert rope["full_attention"]["rope_theta"] == 1e6 and rope["sliding_attention"]["rope_theta"] == 1e4
    assert standin.parameters("gemma-3-4b", tok) == PUBLISHED["parameters"]


def test_the_standin_tokenizer_has_gemma3s_ids_and_round_trips(tok):
    assert len(tok) == PUBLISHED["tokenizer_size"]
    assert {t: tok.convert_tokens_to_ids(t) for t in PUBLISHED["tokenizer"]} == PUBLISHED["tokenizer"]
    text = "Ein Riss, 3 mm lang — über die ganze Kante.\nNext line"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte fallback: anything


def test_base_shape_writes_a_folder_that_train_and_evaluate_load_as_a_hub_checkpoint(params, tmp_path, base_dir,
                                                                                     records, capsys):
    out = tmp_path / "standin"
    assert cli.run(["base", "--params", str(ROOT / "params.yaml"), "--shape", "gemma-3-tiny", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokenizer"] == PUBLISHED["tokenizer_size"] and summary["vocab_size"] == 262_208
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in PUBLISHED["top"] if k != "mm_tokens_per_image"} == {
        k: v for k, v in PUBLISHED["top"].items() if k != "mm_tokens_per_image"}
    assert (out / "chat_template.jinja").is_file() and (out / "weights_sha256.txt").is_file()
    # a non-empty folder is not overwritten; an unknown shape is named
    assert cli.run(["base", "--params", str(ROOT / "params.yaml"), "--shape", "gemma-3-tiny", "--out", str(out)]) == 2
    assert cli.run(["base", "--params", str(ROOT / "params.yaml"), "--shape", "gemma-9", "--out", str(tmp_path / "x")]) == 2
    assert "unknown shape 'gemma-9'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    p = dataclasses.replace(params, model=dataclasses.replace(params.model, base=str(out)))
    p = trained_project(p, tmp_path / "project", base_dir, records, max_steps=2, max_length=512)
    adapter = tmp_path / "project" / "models" / "adapter"
    meta = json.loads((adapter / "pipeline_meta.json").read_text())
    assert meta["base"] == str(out) and meta["base_weights_sha256"] == summary["weights_sha256"]
    evaluate.main(p)
    m = json.loads((tmp_path / "project" / "reports" / "metrics.json").read_text())
    assert m["n"] == len(records[32:]) and 0.0 <= m["f1_macro"] <= 1.0
    assert len(m["image_reliance"]) and "mismatch_auroc" in m
