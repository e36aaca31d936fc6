"""A hub-format stand-in for a real checkpoint: Gemma 3's architecture at a published size, random weights.

No weights can be downloaded here, yet the real-size path (a `save_pretrained` folder named by
`model.base`, 4-bit quantisation, a 262k vocabulary, 896-px images with 256 soft tokens, checkpoints of that
size, generation) must run through the same code as `google/gemma-3-4b-it`. `write` saves such a folder:
the model built from Gemma 3 4B's published config (`SHAPES["gemma-3-4b"]`, from the checkpoint's
`config.json` and `preprocessor_config.json`), randomly initialised; a processor with Gemma 3's image
settings and chat template; and a tokenizer whose special tokens sit at Gemma 3's ids (pad 0, eos 1, bos 2,
unk 3, turns 105 / 106, image 255,999 / 256,000 / 262,144) in a vocabulary of Gemma 3's size. The
tokenizer's pieces are learnt locally (BPE with byte fallback, the built-in's recipe) and renumbered around
those ids; the ids in between are unused placeholders, as Gemma's own `<unusedN>` tokens. Only the weights
and the word pieces differ from the real checkpoint, so speed, memory and every shape are the real ones.

`gemma-3-tiny` has the same vocabulary, special ids and image processing at a few thousandth of the size,
for the tests on a CPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import model as modelmod
from pipeline.errors import InputError

GEMMA3_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106,
              "<start_of_image>": 255_999, "<end_of_image>": 256_000, "<image_soft_token>": 262_144}
TOKENIZER_SIZE = 262_145  # Gemma 3's tokenizer: ids 0 ... 262,144 (the image soft token is the last)
VOCAB_SIZE = 262_208      # the embedding's rows (the tokenizer's size padded to a multiple of 64)
PIECES = 8_000            # word pieces learnt locally; the rest of the ids are placeholders


@dataclass(frozen=True)
class Shape:
    text: dict
    vision: dict
    image_size: int
    tokens_per_image: int
    vocab_size: int = VOCAB_SIZE


SHAPES = {
    # google/gemma-3-4b-it: config.json (text_config, vision_config) and preprocessor_config.json
    "gemma-3-4b": Shape(
        text=dict(hidden_size=2560, intermediate_size=10_240, num_hidden_layers=34, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                  rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1_000_000.0,
                  rope_local_base_freq=10_000.0, max_position_embeddings=131_072, rms_norm_eps=1e-6),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14, layer_norm_eps=1e-6),
        image_size=896, tokens_per_image=256),
    # the tests' shape: Gemma 3's vocabulary, ids and image pipeline, 2 layers of 32 / 64 wide
    "gemma-3-tiny": Shape(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=256,
                  max_position_embeddings=2048),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=224, patch_size=28),
        image_size=224, tokens_per_image=16),
}


def tokenizer(corpus: list[str], pieces: int = PIECES):
    """A tokenizer with Gemma 3's special ids and size: BPE pieces learnt on `corpus`, renumbered."""
    from tokenizers import Tokenizer

    spec = json.loads(modelmod.train_bpe(corpus, pieces).to_str())
    learnt = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    reserved = set(GEMMA3_IDS.values())
    free = (i for i in range(TOKENIZER_SIZE) if i not in reserved)
    vocab = {tok: GEMMA3_IDS[tok] if tok in GEMMA3_IDS else next(free) for tok, _ in learnt}
    vocab.update({f"<unused{i}>": i for i in free})  # placeholders, never produced (no merge leads to them)
    spec["model"]["vocab"] = vocab
    for added in spec["added_tokens"]:
        added["id"] = vocab[added["content"]]
    return modelmod.wrap_tokenizer(Tokenizer.from_str(json.dumps(spec)))


def config(shape: str, tok):
    """The Gemma3Config of `shape`, with `tok`'s special ids (Gemma 3's)."""
    s = shape_of(shape)
    return modelmod.gemma3_config(tok, s.text, s.vision, s.tokens_per_image, s.vocab_size)


def parameters(shape: str, tok) -> int:
    """How many parameters the model of `shape` has (counted on the meta device: nothing allocated)."""
    from transformers import Gemma3ForConditionalGeneration

    with torch.device("meta"):
        return sum(p.numel() for p in Gemma3ForConditionalGeneration(config(shape, tok)).parameters())


def write(shape: str, out: Path, corpus: list[str], seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Save the stand-in of `shape` (model, processor, tokenizer, chat template) into the folder `out`,
    which must not exist yet or be empty; returns a summary."""
    from transformers import Gemma3ForConditionalGeneration

    s = shape_of(shape)
    tok = tokenizer(corpus)
    processor = modelmod.build_processor(tok, s.image_size, s.tokens_per_image)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` directly: the 4B model never exists in fp32 (17 GB)
    try:
        model = Gemma3ForConditionalGeneration(config(shape, tok))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype),
               "tokenizer": len(tok), "vocab_size": s.vocab_size, "image_size": s.image_size,
               "tokens_per_image": s.tokens_per_image, "seed": seed,
               "weights_sha256": modelmod.store_weights_sha256(out)}
    (Path(out) / "standin.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def shape_of(name: str) -> Shape:
    if name not in SHAPES:
        raise InputError(f"base --shape: unknown shape {name!r} (one of {sorted(SHAPES)})")
    return SHAPES[name]
