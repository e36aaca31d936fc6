"""params.yaml -> typed, strict, frozen config objects.

Every key in params.yaml is a field here, letter for letter. A misspelt or unknown key, a missing
key, or a value of the wrong type is an `InputError` that names the full dotted key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.errors import InputError


@dataclass(frozen=True)
class Paths:
    raw: str = "data/raw"
    curated: str = "data/curated"
    split: str = "data/split"
    models: str = "models"
    reports: str = "reports"
    incoming: str = "data/incoming"
    eval: str = "data/eval"
    batches: str = "data/batches"


@dataclass(frozen=True)
class Data:
    """What the dataset at hand is: no default belongs to one domain (params.yaml sets the lesions')."""

    labels: tuple[str, ...] = ()
    positive_label: str = ""          # the label whose recall is compared across subgroups ("": none)
    subgroups: tuple[str, ...] = ()
    system_prompt: str = ""
    prompt: str = "Describe the image."
    label_pattern: str = r"Label: (\w+)"


@dataclass(frozen=True)
class Faults:
    """Shares of injected faults (each a fraction of the clean rows)."""

    vague: float = 0.0
    mismatch: float = 0.0
    mismatch_mode: Literal["random", "same_site"] = "random"
    exact_duplicate: float = 0.0
    near_duplicate: float = 0.0
    corrupt: float = 0.0
    not_image: float = 0.0
    empty_file: float = 0.0


@dataclass(frozen=True)
class Synth:
    n: int = 600
    seed: int = 0
    image_size: int = 96
    images_per_patient: tuple[int, int] = (1, 4)
    skin_mix: dict[str, float] = field(default_factory=dict)
    class_mix: dict[str, float] = field(default_factory=dict)
    site: str = "hospital_a"  # several: "hospital_a,hospital_b" (patients alternate between them)
    camera: str = "dermatoscope"  # dermatoscope | phone | lamp; one, or one per site
    spurious_darkness: float = 0.0
    tds_margin: float = 0.0  # benign and melanoma lesions keep this far from the suspicious band's edges
    attributes: Literal["typical", "uniform"] = "typical"  # class-typical colours/structures, or any
    faults: Faults = Faults()


@dataclass(frozen=True)
class Mismatch:
    """The secondary image-text model that scores every pair (open_clip)."""

    enabled: bool = True
    model: str = "features"       # features | builtin | an open_clip name (zero-shot)
    pretrained: Optional[str] = None
    folds: int = 5
    # model: features -- frozen generic image features + caption TF-IDF, cross-fitted light heads
    feature_size: int = 64        # side the image is resized to for its features
    text_features: int = 4096     # TF-IDF vocabulary cap (words and word pairs)
    head_hidden: int = 256
    head_epochs: int = 15
    head_max_steps: int = 1500    # per fold and pass: bounds the cost at 10^5+ pairs
    head_batch_size: int = 256
    head_lr: float = 2e-3
    refit: bool = True            # a second pass whose heads do not train on the first pass's flags
    # the decision: flag a pair when the held-out model prefers more than `max_preferred` of the other
    # held-out captions (and images) over the given one by at least `margin` logits
    rule: Literal["preferred", "zscore"] = "preferred"
    margin: float = 2.0
    max_preferred: float = 0.2
    # model: builtin -- a small CLIP trained from scratch per fold (slow; kept for comparison)
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.2
    shift: float = 0.1
    rotate_flip: bool = True      # random 90° rotations and flips: only if no caption names a side
    image_size: int = 96
    embed_dim: int = 64
    score: Literal["csls", "cosine"] = "csls"
    csls_k: int = 10
    threshold: float = 3.5
    top_fraction: Optional[float] = None
    seed: int = 0


@dataclass(frozen=True)
class Curate:
    max_pixels: int = 25_000_000
    min_side: int = 32
    max_side: int = 8192
    max_caption_chars: int = 2000
    min_words: int = 6
    vague_phrases: tuple[str, ...] = ()
    visual_terms: tuple[str, ...] = ()
    near_duplicate_bits: int = 26
    near_duplicate_confirm: float = 0.0  # > 0: a pHash pair must also differ by at most this, pixel by pixel
    workers: int = 0              # processes for the image checks and features (0: all cores)
    mismatch: Mismatch = Mismatch()


@dataclass(frozen=True)
class Split:
    seed: int = 0
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    min_stratum: int = 10
    mismatch_fraction: float = 0.5
    search_iters: int = 10000
    restarts: int = 10
    pinned_test: tuple[str, ...] = ()  # jsonl files of earlier test sets: their patients stay in test


@dataclass(frozen=True)
class Tower:
    """Size of one tower of the built-in model."""

    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 1
    patch_size: int = 8


@dataclass(frozen=True)
class ModelCfg:
    base: str = "builtin:tiny-gemma3"  # or a Hugging Face id / local path, e.g. google/gemma-3-4b-it
    image_size: int = 64
    tokens_per_image: int = 16
    vocab_size: int = 1024
    vision: Tower = Tower()
    text: Tower = Tower()
    attn_implementation: Literal["eager", "sdpa"] = "eager"  # sdpa: PyTorch's fused attention, same logits


@dataclass(frozen=True)
class Base:
    """Brief generic pre-training of the built-in model (a stand-in for a foundation checkpoint)."""

    seed: int = 0
    images: int = 512
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    vision_lr: float = 2e-3       # the vision tower's own rate (0: left at its random initialisation)
    captions: str = "data/split/train.jsonl"  # whose captions it reads: the training split (ingest freezes it)
    corpus_captions: int = 2000   # at most this many of them for the tokenizer and the LM
    text_batch_size: int = 16     # training-split captions read text-only each step (0: none)
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "ring", "star", "cross", "bar", "blob")  # the
                                  # scenes' things; the lines (line, wavy line, zigzag line, branching line) too


@dataclass(frozen=True)
class Lr:
    vision: float = 2e-4
    text: float = 5e-4


@dataclass(frozen=True)
class Peft:
    method: Literal["lora", "qlora", "dora", "adapter"] = "lora"
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)
    adapt_vision: bool = True
    adapt_patch_embedding: bool = False  # LoRA on the vision tower's patch-embedding convolution too
    full_vision: bool = False      # vision tower + projector trained in full (PEFT modules_to_save), not by LoRA
    keep_vision_16bit: bool = True
    frozen_fp32: bool = True       # qlora: frozen 16-bit weights cast to fp32 (PEFT's default); false keeps them 16-bit
    adapter_name: str = "default"


@dataclass(frozen=True)
class Loss:
    w_con: float = 0.4
    w_ce: float = 0.5
    w_mse: float = 0.1
    tau: float = 0.07
    learnable_tau: bool = False
    queue_size: int = 0
    embed_dim: int = 64
    text_grad: bool = False


@dataclass(frozen=True)
class Distributed:
    """Data parallelism across processes (torchrun); `train.batch_size` is the global micro-batch."""

    nproc_per_node: int = 1        # > 1 (or nnodes > 1): `train` starts the processes itself through torchrun;
                                   # 0: one per GPU of the node (one on a machine without)
    nnodes: int = 1
    node_rank: int = 0             # this node's place (0 on the node whose address is rdzv_endpoint)
    rdzv_endpoint: str = "127.0.0.1:29500"  # c10d rendezvous: host:port of node 0, the same on every node
    rdzv_id: str = "pipeline-train"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPUs, gloo on the CPU
    strategy: Literal["ddp", "fsdp"] = "ddp"
    gather: bool = True            # contrastive over the global batch (embeddings gathered with gradient)


@dataclass(frozen=True)
class Augment:
    """Random changes to the training images (train only; off by default). None may change what the
    caption says: flip only an axis that no caption names (a note that says "left side" forbids hflip)."""

    shift: float = 0.0             # random translation of up to this share of the side (edges replicated)
    brightness: float = 0.0        # add U(-b, b) to every pixel (pixels in [0, 1])
    contrast: float = 0.0          # scale around the image's mean by U(1 - c, 1 + c)
    hflip: bool = False            # mirror left-right with probability 0.5
    vflip: bool = False            # mirror top-bottom with probability 0.5


@dataclass(frozen=True)
class Select:
    """Which weights the adapter keeps: the last epoch's, or the epoch whose greedy answers on the
    validation split score the best `metric` (checked every `every` epochs and after the last one)."""

    metric: Literal["last", "f1_macro"] = "last"
    every: int = 5


@dataclass(frozen=True)
class Train:
    seed: int = 0
    epochs: int = 3
    max_steps: int = 0  # > 0 caps the run
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    ema: float = 0.0               # > 0: the adapter keeps an exponential moving average of the trainable weights
                                   # with this decay (torch's AveragedModel EMA); validation and saving use it
    grad_checkpointing: Literal[False, True, "vision", "text"] = False  # true: both towers
    ce_chunk: int = 0              # > 0: fused linear cross-entropy over this many answer tokens at a time
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"  # 8-bit: moments in 8 bits
    checkpoint_every: int = 20
    max_length: int = 256
    augment: Augment = Augment()
    select: Select = Select()
    lr: Lr = Lr()
    peft: Peft = Peft()
    loss: Loss = Loss()
    distributed: Distributed = Distributed()


@dataclass(frozen=True)
class MlflowCfg:
    experiment: str = "multimodal-alignment"
    registered_model: str = "multimodal-adapter"


@dataclass(frozen=True)
class Bias:
    min_group_size: int = 10      # smaller groups are reported as insufficient (and fail the gate)
    bootstrap: int = 1000         # seeded resamples for the gap's confidence interval
    confidence: float = 0.95
    insufficient: Literal["fail", "warn"] = "fail"
    groups: dict[str, str] = field(default_factory=dict)  # subgroup value -> group judged (others: itself)


@dataclass(frozen=True)
class Gates:
    min_f1_macro: float = 0.8
    max_ignore_rate: float = 0.2
    max_bias_gap: float = 0.3     # judged on the upper confidence bound of the largest F1 gap
    min_mismatch_auroc: float = 0.7
    max_recall_gap: Optional[float] = None  # upper bound of the largest recall gap of data.positive_label; null: not judged


@dataclass(frozen=True)
class Evaluate:
    seed: int = 0
    batch_size: int = 32
    max_new_tokens: int = 160
    permutations: int = 5          # image swaps (each sample gets an image of another label)
    blank_value: int = 128         # grey level of the blank image
    sets: dict[str, str] = field(default_factory=dict)  # extra evaluation sets: name -> jsonl
    attributes: tuple[str, ...] = ()  # visual terms checked by the "clinically acceptable" rate
    bias: Bias = Bias()
    gates: Gates = Gates()


@dataclass(frozen=True)
class Promote:
    primary_metric: str = "f1_macro"
    min_improvement: float = 0.0   # the challenger must beat the champion by more than this
    improve_on: tuple[str, ...] = ("test",)   # sets on which the primary metric must improve
    max_drop: float = 0.02         # on every other set, the most the primary metric may fall
    min_samples: int = 30          # per set, samples neither model trained or validated on; fewer: no decision
    approval: Literal["none", "required"] = "none"  # required: `champion` moves only after a person approves


@dataclass(frozen=True)
class Monitor:
    seed: int = 0
    alpha: float = 0.01            # significance level of every drift test (permutation p-values, Holm-adjusted)
    permutations: int = 1999       # permutation draws per test (the smallest p-value is 1 / (permutations + 1))
    correction: Literal["holm", "bonferroni"] = "holm"  # across the five kinds of shift
    max_rows: int = 1000           # each side is subsampled (seeded) above this
    pca_components: int = 20       # embeddings are reduced with PCA (fit on the reference) above this
    embedding: Literal["mmd", "model"] = "mmd"  # image-embedding statistic: MMD^2 | domain-classifier ROC AUC
    alignment: Literal["ks", "mean"] = "ks"     # statistic of the per-sample contrastive loss
    condition_on: tuple[str, ...] = ("label", "subgroups")  # covariate / text / alignment tests within these strata
    cluster_column: str = "patient_id"  # rows sharing a value are not independent: each test reads one per value
    text_features: int = 2048      # caption features: TF-IDF of the most frequent words and word pairs
    reference_captions: int = 256  # the fixed caption set each pair's InfoNCE loss is computed against
    min_captions: int = 20         # fewer captioned rows: no text or alignment test
    max_unreadable: float = 0.5    # above this share of rows failing the image checks: "unreadable", not drift
    min_rows: int = 20             # fewer readable images: "too small", no verdict
    adapter: Literal["champion", "local"] = "champion"  # whose alignment score: the registry's champion or models/adapter
    retrain_on: tuple[str, ...] = ("covariate", "alignment")  # kinds that call for a re-fine-tune; others: alert
    max_f1_drop: Optional[float] = 0.05  # ... and only when the champion's F1 falls by more (null: drift alone)
    harm_rows: int = 200           # rows of the batch (and of val) the champion answers to measure / estimate F1
    bootstrap: int = 200           # bootstrap draws of the F1 interval


@dataclass(frozen=True)
class Ingest:
    seed: int = 0
    holdout: float = 0.3           # share of the batch's patients kept out of training, to evaluate on
    method: Literal["lora", "qlora", "dora", "adapter"] = "qlora"  # the re-fine-tune's PEFT method


@dataclass(frozen=True)
class Publish:
    remote: str = "shared"         # DVC remote (by name, from .dvc/config); "" = commit only, no push
    message: str = "pipeline: new model version"


@dataclass(frozen=True)
class Params:
    paths: Paths = Paths()
    data: Data = Data()
    synth: Synth = Synth()
    curate: Curate = Curate()
    split: Split = Split()
    model: ModelCfg = ModelCfg()
    base: Base = Base()
    train: Train = Train()
    mlflow: MlflowCfg = MlflowCfg()
    evaluate: Evaluate = Evaluate()
    promote: Promote = Promote()
    monitor: Monitor = Monitor()
    ingest: Ingest = Ingest()
    publish: Publish = Publish()


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples; raise naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_dataclass_type(tp):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise InputError(f"params: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"params: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise InputError(f"params: {key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise InputError(f"params: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise InputError(f"params: {key} must be {tp.__name__}, got {value!r}")
    return value


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are errors, absent keys take defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"params: {prefix or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise InputError(
            f"params: unknown key {where}{unknown[0]} (known keys{' in ' + prefix if prefix else ''}: {sorted(names)})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], value read as YAML)."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise InputError(f"--set {text!r}: value is not valid YAML ({e})") from None


def load(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read params.yaml, apply `--set` overrides, validate everything."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise InputError(f"params: file {path} not found") from None
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"params: cannot read {path}: {e}") from None
    return build(Params, apply_overrides(raw, overrides))


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set each `section.key=value` in the raw mapping (in place) and return it."""
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return raw


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Config object -> {'train.lr.vision': 2e-4, ...} (MLflow logs params flat)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
