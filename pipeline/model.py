"""The one model module: the built-in tiny Gemma 3, loading (a base for training, an adapter for
inference, 4-bit, device and dtype), PEFT wrapping, and the pieces every stage runs (the backbone under
PEFT, the answer-only cross-entropy, the caption anchor).

`builtin:tiny-gemma3` is a small model of the real architecture (`Gemma3ForConditionalGeneration`:
SigLIP vision tower + projector + Gemma 3 text model) built from a config, with a BPE tokenizer trained
locally that holds Gemma 3's special tokens and Google's Gemma 3 chat template. It is saved as a normal
model + processor folder, so every later stage loads it exactly as it would a checkpoint from the hub.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import chat, config, distributed
from pipeline.chat import GEMMA3_CHAT_TEMPLATE
from pipeline.collate import Collator
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
    return wrap_tokenizer(train_bpe(corpus, vocab_size))


def train_bpe(corpus: list[str], vocab_size: int):
    """The `tokenizers` BPE model behind `build_tokenizer` (special tokens first, then 256 byte tokens)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")  # SentencePiece-style spaces, as Gemma's tokenizer
    # a newline is always its own piece, so "model\n" + answer tokenises the same alone or joined
    tok.pre_tokenizer = pre_tokenizers.Split("\n", behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + byte_tokens,
                                  initial_alphabet=[], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def wrap_tokenizer(tok):
    """A `tokenizers.Tokenizer` as the transformers tokenizer Gemma 3's processor expects."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens=dict(NAMED_TOKENS))


def build_processor(tokenizer, image_size: int, tokens_per_image: int):
    """Gemma 3's processor: its image processor (SigLIP's 0.5 / 0.5 normalisation, bilinear resize to a
    square of `image_size`), `tokenizer`, Google's chat template, `tokens_per_image` soft tokens."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    images = Gemma3ImageProcessor(size={"height": image_size, "width": image_size},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                           image_seq_length=tokens_per_image)


def gemma3_config(tokenizer, text: dict, vision: dict, tokens_per_image: int, vocab_size: int | None = None):
    """A Gemma3Config: `text` / `vision` hold the two towers' sizes; the special tokens' ids are the
    tokenizer's; `vocab_size` (the embedding's rows, >= the tokenizer's size) defaults to the tokenizer's."""
    from transformers import Gemma3Config

    ids = tokenizer.convert_tokens_to_ids
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise InputError(f"model: vocab_size {vocab_size} < the tokenizer's {len(tokenizer)} tokens")
    return Gemma3Config(
        text_config={"vocab_size": vocab_size or len(tokenizer), **text},
        vision_config={"vision_use_head": False, **vision},  # as Gemma 3: the projector reads every patch
        mm_tokens_per_image=tokens_per_image, boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def check_image_grid(cfg: ModelCfg) -> None:
    """The projector average-pools the vision tower's grid of patches (image_size / patch_size a side) into
    a grid of tokens_per_image (sqrt of it a side): both must be whole and the second divide the first."""
    patch, size, tokens = cfg.vision.patch_size, cfg.image_size, cfg.tokens_per_image
    if patch <= 0 or size % patch:
        raise InputError(f"model: image_size {size} is not a multiple of model.vision.patch_size {patch}")
    grid, side = size // patch, round(tokens ** 0.5) if tokens > 0 else 0
    if side == 0 or side * side != tokens or grid % side:
        divisors = [d * d for d in range(1, grid + 1) if grid % d == 0]
        raise InputError(f"model: tokens_per_image {tokens} does not pool the {grid} x {grid} patches of a "
                         f"{size}-pixel image (patch {patch}): one of {divisors}")


def build_config(tokenizer, cfg: ModelCfg):
    """A Gemma3Config of the built-in's size (2 layers, hidden 64 by default)."""
    check_image_grid(cfg)
    t, v = cfg.text, cfg.vision
    return gemma3_config(
        tokenizer,
        text=dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.layers,
                  num_attention_heads=t.heads, num_key_value_heads=t.kv_heads, head_dim=t.hidden_size // t.heads,
                  query_pre_attn_scalar=t.hidden_size // t.heads, max_position_embeddings=1024, sliding_window=256),
        vision=dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.layers,
                    num_attention_heads=v.heads, image_size=cfg.image_size, patch_size=v.patch_size),
        tokens_per_image=cfg.tokens_per_image)


def build_builtin(cfg: ModelCfg, corpus: list[str], seed: int):
    """(model, processor) of the built-in tiny Gemma 3, randomly initialised."""
    from transformers import Gemma3ForConditionalGeneration

    tokenizer = build_tokenizer(corpus, cfg.vocab_size)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(build_config(tokenizer, cfg))
    return model, build_processor(tokenizer, cfg.image_size, cfg.tokens_per_image)


def source_of(cfg: ModelCfg, models_dir: str) -> str:
    """Where `model.base` is loaded from: the built-in's folder, or a hub id / local path as given."""
    return str(Path(models_dir) / "base") if cfg.base == BUILTIN else cfg.base


WEIGHTS_HASH_FILE = "weights_sha256.txt"  # written beside the built-in base's weights by `base`
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def weights_sha256(source: str) -> str:
    """A hash of the base's weights files (names and bytes): what caches and compatibility checks key on,
    so that a re-trained base of the same shape is a different base. Read from the file `base` stores
    beside the built-in; computed (once per process) for any other local folder; a hub id is its name."""
    folder = Path(source)
    if (folder / WEIGHTS_HASH_FILE).is_file():
        return (folder / WEIGHTS_HASH_FILE).read_text().strip()
    if not folder.is_dir():
        return f"hub:{source}"
    files = _weight_files(folder.resolve())
    return _hash_weights(str(folder.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


@functools.lru_cache(maxsize=8)
def _hash_weights(folder: str, signature: tuple = ()) -> str:
    """(`signature`: the files' sizes and times, so that weights rewritten in place are hashed again.)"""
    h = hashlib.sha256()
    for f in _weight_files(Path(folder)):
        h.update(str(f.relative_to(folder)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def store_weights_sha256(folder: Path) -> str:
    """Hash a freshly saved base's weights once and keep the hash beside them."""
    digest = _hash_weights.__wrapped__(str(Path(folder).resolve()))  # not cached: a fresh folder
    (Path(folder) / WEIGHTS_HASH_FILE).write_text(digest + "\n")
    return digest


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, in GiB: the GPU's allocations (`peak_gpu_gib`, on a GPU) and the
    resident set (`peak_rss_gib`): what a stage records beside its figures."""
    import resource

    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}  # KiB on Linux
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """bf16 on a GPU (this rank's), fp32 on the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    return torch.device("cpu"), torch.float32


def base_source(params: config.Params) -> str:
    """`model.base`'s folder or hub id; the built-in must have been built by `base`."""
    source = source_of(params.model, params.paths.models)
    if params.model.base == BUILTIN and not Path(source).is_dir():
        raise InputError(f"model.base: the built-in base model is missing at {source} (run `python -m pipeline base`)")
    return source


def load(source: str, quantize: bool = False, keep_vision_16bit: bool = True, dtype=torch.float32,
         sharded: bool = False, device: torch.device | None = None, attn_implementation: str = "eager"):
    """(model, processor) from a folder or hub id; `quantize`: 4-bit NF4 base with double quantisation;
    `sharded`: the 4-bit data stored in `dtype` tensors, which FSDP shards like every other parameter
    (FSDP-QLoRA). A 4-bit model is quantised where it is placed: on `device` when that is a GPU."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    # eager or sdpa: both honour Gemma 3's bidirectional attention among one image's tokens (flash
    # attention does not, and transformers refuses it for Gemma 3); tests/test_attention.py checks both
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn_implementation}
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


def patch_embedding(model: nn.Module) -> list[str]:
    """Full names of the vision tower's patch-embedding convolutions (SigLIP's `patch_embedding`)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.split(".")[-1] == "patch_embedding"
            and n.startswith(_vision_prefixes(model))]


def _vision_prefixes(model: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, _ in model.named_modules() if n.split(".")[-1] in VISION_MODULES)


def apply_peft(model: nn.Module, cfg: Peft, adapter_name: str = "default"):
    """Wrap `model` with LoRA / DoRA (QLoRA = LoRA on a 4-bit base); the base is frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method not in ("lora", "qlora", "dora", "adapter"):
        raise InputError(f"train.peft.method: unknown method {cfg.method!r} (lora, qlora, dora, adapter)")
    if cfg.method == "qlora" and cfg.frozen_fp32:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif cfg.method == "qlora":  # the same, less the cast of every frozen 16-bit weight to fp32 (2 bytes more each)
        for q in model.parameters():
            q.requires_grad_(False)
    full = full_vision_modules(model, cfg)
    targets = target_modules(model, cfg.target_modules, cfg.adapt_vision and not full)
    if cfg.adapt_patch_embedding and not full:  # the first layer that sees pixels: frozen, it keeps the base's notion of a patch
        conv = patch_embedding(model)
        if not conv:
            raise InputError("train.peft.adapt_patch_embedding: this model has no vision patch_embedding convolution")
        targets += conv
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      use_dora=cfg.method == "dora", bias="none", modules_to_save=full or None)
    return get_peft_model(model, lora, adapter_name=adapter_name)


def full_vision_modules(model: nn.Module, cfg: Peft) -> list[str]:
    """With `full_vision`: the vision tower and projector, trained in full as PEFT `modules_to_save` (a
    trainable copy saved in the adapter; the base's own stays frozen, and `disable_adapter` still reads it).
    A 4-bit vision tower cannot be trained in full: QLoRA needs `keep_vision_16bit`."""
    if not cfg.full_vision:
        return []
    if cfg.method == "qlora" and not cfg.keep_vision_16bit:
        raise InputError("train.peft.full_vision needs train.peft.keep_vision_16bit with qlora "
                         "(a 4-bit vision tower cannot be trained in full)")
    names = [n.split(".")[-1] for n in _vision_prefixes(model)]
    if not names:
        raise InputError("train.peft.full_vision: this model has no vision_tower / multi_modal_projector")
    return sorted(set(names))


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


# ------------------------------------------------------------------------------ loading for a stage
def load_trainable(params: config.Params, device, dtype):
    """(PEFT model, processor) for `train`: the base (4-bit for QLoRA) on `device`, adapters on top."""
    cfg = params.train.peft
    model, processor = load(base_source(params), quantize=cfg.method == "qlora", keep_vision_16bit=cfg.keep_vision_16bit,
                            dtype=dtype, sharded=params.train.distributed.strategy == "fsdp", device=device,
                            attn_implementation=params.model.attn_implementation)
    if cfg.method != "qlora":
        model.to(device)
    return apply_peft(model, cfg, adapter_name=cfg.adapter_name), processor


SEEN_IDS = "seen_ids.json"  # beside an adapter: {"train": [ids], "val": [ids]} of the samples it learnt from


def seen_ids_sha256(seen: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps({k: sorted(v) for k, v in sorted(seen.items())}).encode()).hexdigest()


def seen_ids(adapter: Path) -> set[str] | None:
    """Every id an adapter trained or validated on; None for an adapter that does not record them."""
    path = Path(adapter) / SEEN_IDS
    if not path.is_file():
        return None
    return {i for ids in json.loads(path.read_text()).values() for i in ids}


def adapter_meta(params: config.Params, model) -> dict:
    """What `pipeline_meta.json` records beside an adapter, so that it is loaded as it was trained."""
    p = params.train.peft
    return {"base": params.model.base, "base_source": source_of(params.model, params.paths.models),
            "base_weights_sha256": weights_sha256(base_source(params)), "labels": list(params.data.labels),
            "method": p.method, "keep_vision_16bit": p.keep_vision_16bit, "adapter_name": p.adapter_name,
            "embed_dim": params.train.loss.embed_dim, "text_grad": params.train.loss.text_grad}


@dataclass
class Loaded:
    """An adapter on its base, with its alignment heads, ready for inference."""

    model: object
    processor: object
    heads: AlignmentHeads
    meta: dict
    device: torch.device


def load_adapter(adapter: Path, params: config.Params, who: str = "evaluate", full_precision: bool = False) -> Loaded:
    """The base of `model.base` with the adapter at `adapter` in the precision it was trained in (4-bit
    base for QLoRA, vision tower kept 16-bit as recorded); refuses an adapter of another base.
    `full_precision`: the base unquantized whatever the method (a QLoRA adapter merged into a 16-bit copy)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter = Path(adapter)
    if not (adapter / "pipeline_meta.json").is_file():
        raise InputError(f"{who}: {adapter} is not an adapter written by `train` (no pipeline_meta.json)")
    meta = json.loads((adapter / "pipeline_meta.json").read_text())
    if meta.get("base") != params.model.base:
        raise InputError(f"{who}: the adapter at {adapter} was trained on base {meta.get('base')!r}, "
                         f"but model.base is {params.model.base!r}")
    source = base_source(params)
    have = weights_sha256(source)
    if meta.get("base_weights_sha256", have) != have:
        raise InputError(f"{who}: the adapter at {adapter} was trained on base weights {meta['base_weights_sha256']}, "
                         f"but {source} holds weights {have}; re-run train")
    device, dtype = device_and_dtype()
    quantize = meta.get("method") == "qlora" and not full_precision
    base, processor = load(source, quantize=quantize, keep_vision_16bit=meta.get("keep_vision_16bit", True),
                           dtype=dtype, device=device, attn_implementation=params.model.attn_implementation)
    if not quantize:
        base.to(device)
    try:
        model = PeftModel.from_pretrained(base, adapter, adapter_name=meta.get("adapter_name", "default"))
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"{who}: the adapter at {adapter} does not fit the base model {source}: {e}") from None
    model.eval()
    heads = AlignmentHeads(base.config.get_text_config().hidden_size, meta.get("embed_dim", params.train.loss.embed_dim))
    weights = load_file(adapter / "alignment_heads.safetensors")
    heads.load_state_dict({k[len("heads."):]: v for k, v in weights.items() if k.startswith("heads.")})
    return Loaded(model, processor, heads.to(device).eval(), meta, device)


def checkpoint_towers(model, which) -> None:
    """Gradient (activation) checkpointing: `True` both towers, "vision" the SigLIP tower only (at 896 px
    its 4,096-patch activations are the largest), "text" the language model only, `False` none."""
    if which is False:
        return
    base = backbone(model)
    kwargs = {"use_reentrant": False}
    if which is True:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        tower = base.model.vision_tower if which == "vision" else base.model.language_model
        tower.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


# ------------------------------------------------------------------------------- running the pieces
def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def backbone(model):
    """The Gemma3ForConditionalGeneration under any PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_ce(base, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Causal-LM loss on the answer tokens only; logits are computed for those positions alone
    (the full (B, T, vocab) tensor is never materialised). `chunk` > 0: fused linear cross-entropy, the
    answer tokens taken `chunk` at a time, each chunk's logits recomputed in the backward pass instead of
    kept, so at most (chunk, vocab) logits exist at once (at a 262k vocabulary, 1 GiB per 1,000 tokens in
    fp32). Across processes: this rank's share of the mean over every rank's answer tokens."""
    target = labels[:, 1:]
    keep = target != -100  # (B, T-1)
    h, y = hidden[:, :-1][keep], target[keep]  # (N, H), (N,)
    cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
    if chunk <= 0 or len(y) <= chunk:
        total = _ce_sum(h, y, base.lm_head.weight, base.lm_head.bias, cap)
    else:
        from torch.utils.checkpoint import checkpoint

        head = base.lm_head
        total = sum(checkpoint(_ce_sum, h[i : i + chunk], y[i : i + chunk], head.weight, head.bias, cap,
                               use_reentrant=False) for i in range(0, len(y), chunk))
    return distributed.mean_share(total, keep.sum())


def _ce_sum(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias, cap: float | None) -> torch.Tensor:
    """Summed cross-entropy of the (N, H) hidden states `h` against `y` through the output layer."""
    logits = F.linear(h, weight, bias)  # (N, V)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.float(), y, reduction="sum")


class TextAnchor:
    """Pooled caption features from the frozen base LM (adapters off), cached per caption.

    The text side of the alignment is a fixed target: the base model's own reading of the caption.
    `fill` reads every training caption once before the loop (in a fixed order, so a resumed run gets
    the same bits); after that the text side costs one dictionary look-up per sample.
    """

    def __init__(self):
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def fill(self, model, collator: Collator, records: list[dict], batch_size: int = 32) -> float:
        """Read every distinct caption of `records` once, in a fixed order; returns the seconds spent."""
        start = time.perf_counter()
        by_caption: dict[str, dict] = {}
        for r in records:
            if _caption(r) not in self.cache:
                by_caption.setdefault(_caption(r), r)
        todo = [by_caption[c] for c in sorted(by_caption)]
        device = next(model.parameters()).device
        for i in range(0, len(todo), batch_size):
            self._read(model, to_device(collator(todo[i : i + batch_size]), device))
        return time.perf_counter() - start

    def _read(self, model, batch: dict) -> None:
        with _adapters_off(model):
            hidden = backbone(model).model.language_model(
                input_ids=batch["caption_ids"], attention_mask=batch["caption_attention"]).last_hidden_state
        m = batch["caption_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float()  # (B, H)
        for caption, vec in zip(batch["captions"], pooled):
            self.cache.setdefault(caption, vec)

    @torch.no_grad()
    def __call__(self, model, batch: dict) -> torch.Tensor:
        if any(c not in self.cache for c in batch["captions"]):
            self._read(model, batch)
        return torch.stack([self.cache[c] for c in batch["captions"]])  # (B, H)


def _caption(record: dict) -> str:
    return chat.answer(record["messages"]).strip()


def _adapters_off(model):
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
