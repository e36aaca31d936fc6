"""The one model factory: the built-in tiny Gemma 3, loading any Gemma 3 checkpoint, PEFT wrapping.

`builtin:tiny-gemma3` is a small model of the real architecture (`Gemma3ForConditionalGeneration`:
SigLIP vision tower + projector + Gemma 3 text model) built from a config, with a BPE tokenizer trained
locally that holds Gemma 3's special tokens and Google's Gemma 3 chat template. It is saved as a normal
model + processor folder, so every later stage loads it exactly as it would a checkpoint from the hub.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.chat import GEMMA3_CHAT_TEMPLATE
from pipeline.config import ModelCfg, Peft
from pipeline.errors import InputError

BUILTIN = "builtin:tiny-gemma3"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
NAMED_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
                "sot_token": "<start_of_turn>", "eot_token": "<end_of_turn>"}
VISION_MODULES = ("vision_tower", "multi_modal_projector")


def build_tokenizer(corpus: list[str], vocab_size: int):
    """BPE with byte fallback (any text round-trips), trained on `corpus`, with Gemma 3's special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")  # SentencePiece-style spaces, as Gemma's tokenizer
    # a newline is always its own piece, so "model\n" + answer tokenises the same alone or joined
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + byte_tokens,
                                  initial_alphabet=[], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=dict(NAMED_TOKENS))


def build_processor(tokenizer, cfg: ModelCfg):
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    images = Gemma3ImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                           image_seq_length=cfg.tokens_per_image)


def build_config(tokenizer, cfg: ModelCfg):
    """A Gemma3Config of the built-in's size (2 layers, hidden 64 by default)."""
    from transformers import Gemma3Config

    ids = tokenizer.convert_tokens_to_ids
    t, v = cfg.text, cfg.vision
    return Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.layers, num_attention_heads=t.heads, num_key_value_heads=t.kv_heads,
                         head_dim=t.hidden_size // t.heads, query_pre_attn_scalar=t.hidden_size // t.heads,
                         max_position_embeddings=1024, sliding_window=256),
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.layers,
                           num_attention_heads=v.heads, image_size=cfg.image_size, patch_size=v.patch_size,
                           vision_use_head=False),  # as Gemma 3: the projector reads every patch, no pooling head
        mm_tokens_per_image=cfg.tokens_per_image, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build_builtin(cfg: ModelCfg, corpus: list[str], seed: int):
    """(model, processor) of the built-in tiny Gemma 3, randomly initialised."""
    from transformers import Gemma3ForConditionalGeneration

    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(build_config(tokenizer, cfg))
    return model, build_processor(tokenizer, cfg)


def source_of(cfg: ModelCfg, models_dir: str) -> str:
    """Where `model.base` is loaded from: the built-in's folder, or a hub id / local path as given."""
    return str(Path(models_dir) / "base") if cfg.base == BUILTIN else cfg.base


def config_sha256(cfg) -> str:
    d = cfg.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "quantization_config"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def load(source: str, quantize: bool = False, keep_vision_16bit: bool = True, dtype=torch.float32,
         sharded: bool = False, device: torch.device | None = None):
    """(model, processor) from a folder or hub id; `quantize`: 4-bit NF4 base with double quantisation;
    `sharded`: the 4-bit data stored in `dtype` tensors, which FSDP shards like every other parameter
    (FSDP-QLoRA). A 4-bit model is quantised where it is placed: on `device` when that is a GPU."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    kwargs: dict = {"dtype": dtype, "attn_implementation": "eager"}
    if quantize:
        kwargs["quantization_config"] = nf4_config(keep_vision_16bit, dtype, dtype if sharded else torch.uint8)
        if device is not None and device.type == "cuda":
            kwargs["device_map"] = {"": device}
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = Gemma3ForConditionalGeneration.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"model.base: cannot load {source!r}: {e}") from None
    if quantize:
        for m in model.modules():
            # bitsandbytes' CPU inference path repacks 4-bit weights and needs every output width to be a
            # multiple of 32 (the built-in model's 16-wide key/value projections are not): keep the plain path
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    return model, processor


def nf4_config(keep_vision_16bit: bool, dtype, storage=torch.uint8):
    """QLoRA's quantisation: NF4 weights, double quantisation; optionally vision tower + projector left out."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise InputError(f"train.peft.method=qlora needs bitsandbytes: {e}") from None
    # transformers matches these from the start of the module name (as regexes) or as suffixes
    skip = [f".*{m}" for m in VISION_MODULES] + ["lm_head"] if keep_vision_16bit else ["lm_head"]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage,
                              llm_int8_skip_modules=skip)


def target_modules(model: nn.Module, names: tuple[str, ...], include_vision: bool) -> list[str]:
    """Full names of the linear layers to adapt; `all-linear` expands to every linear layer but lm_head."""
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit"]
    linear = [n for n in linear if "lm_head" not in n and (include_vision or not n.startswith(_vision_prefixes(model)))]
    if names != ("all-linear",):
        unknown = [t for t in names if not any(n.split(".")[-1] == t for n in linear)]
        if unknown:
            raise InputError(f"train.peft.target_modules: no linear layer named {unknown} in this model")
        linear = [n for n in linear if n.split(".")[-1] in names]
    return linear


def _vision_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, _ in model.named_modules() if n.split(".")[-1] in VISION_MODULES)


def apply_peft(model: nn.Module, cfg: Peft, adapter_name: str = "default"):
    """Wrap `model` with LoRA / DoRA (QLoRA = LoRA on a 4-bit base); the base is frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method not in ("lora", "qlora", "dora", "adapter"):
        raise InputError(f"train.peft.method: unknown method {cfg.method!r} (lora, qlora, dora, adapter)")
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = target_modules(model, cfg.target_modules, cfg.adapt_vision)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_dora=cfg.method == "dora", bias="none")
    return get_peft_model(model, lora, adapter_name=adapter_name)


class AlignmentHeads(nn.Module):
    """Small trainable heads (linear projections, as CLIP's) that map pooled image / caption features
    to the shared (D,) space."""

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.image = nn.Linear(hidden, dim)
        self.text = nn.Linear(hidden, dim)

    def embed_image(self, soft_tokens: torch.Tensor) -> torch.Tensor:
        """(B, T_img, H) projected soft tokens -> (B, D) unit vectors."""
        return F.normalize(self.image(soft_tokens.mean(1)), dim=-1)

    def embed_text(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states over caption tokens, (B, T) mask -> (B, D) unit vectors."""
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return self.embed_pooled((hidden * m).sum(1) / m.sum(1).clamp(min=1))

    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, H) mean-pooled caption features -> (B, D) unit vectors."""
        return F.normalize(self.text(pooled), dim=-1)
