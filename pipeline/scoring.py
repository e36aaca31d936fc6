"""Scoring an adapter: accuracy and what accuracy hides, as plain functions plus the model runner.

The metric functions take labels and embeddings, so that they can be checked against scikit-learn and
fairlearn and driven by stand-in models; `Evaluator` runs an adapted model (generation, embeddings,
answer likelihood); `evaluate_adapter` puts them together for a set of evaluation sets. The `evaluate`
stage and `promote` (which re-scores the champion on the challenger's sets) both call it.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pipeline import chat, config, data as dataio
from pipeline.errors import InputError

UNPARSEABLE = "<unparseable>"
Predict = Callable[[list[dict], list], list]  # (records, images) -> predicted labels (None: unparseable)


# ------------------------------------------------------------------------------------ classification
def f1_macro(y_true: Sequence[str], y_pred: Sequence, labels: Sequence[str]) -> float:
    """Macro F1 over `labels`; an unparseable prediction (None) is simply wrong."""
    from sklearn.metrics import f1_score

    return float(f1_score(list(y_true), _clean(y_pred), labels=list(labels), average="macro", zero_division=0))


def _clean(y_pred: Sequence) -> list[str]:
    return [UNPARSEABLE if p is None else p for p in y_pred]


def classification(y_true: Sequence[str], y_pred: Sequence, labels: Sequence[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    pred = _clean(y_pred)
    per = f1_score(list(y_true), pred, labels=list(labels), average=None, zero_division=0)
    return {
        "f1_macro": f1_macro(y_true, y_pred, labels),
        "accuracy": float(accuracy_score(list(y_true), pred)),
        "f1_per_class": {l: float(v) for l, v in zip(labels, per)},
        "confusion": confusion_matrix(list(y_true), pred, labels=list(labels) + [UNPARSEABLE]).tolist(),
    }


def attribute_terms(text: str, terms: Sequence[str]) -> set[str]:
    """The visual terms a caption states (longest first, so 'dark brown' is not also 'brown')."""
    found, rest = set(), text.lower()
    for t in sorted(terms, key=len, reverse=True):
        pattern = r"(?<![\w-])" + re.escape(t.lower()) + r"(?![\w-])"
        if re.search(pattern, rest):
            found.add(t)
            rest = re.sub(pattern, " ", rest)
    return found


def clinically_acceptable(references: Sequence[str], answers: Sequence[str], y_true, y_pred,
                          terms: Sequence[str]) -> float | None:
    """Share of samples (among those whose reference states any attribute) with the diagnosis right
    and no attribute stated that the reference (the image's ground truth) does not have."""
    ok, n = 0, 0
    for ref, ans, t, p in zip(references, answers, y_true, y_pred):
        truth = attribute_terms(ref, terms)
        if not truth:
            continue
        n += 1
        ok += int(p == t and attribute_terms(ans, terms) <= truth)
    return ok / n if n else None


# ------------------------------------------------------------------------------------ image reliance
def other_label_swaps(y: Sequence[str], rng: np.random.Generator) -> list[int]:
    """For each sample, the index of a sample of another label whose image it gets."""
    y = np.asarray(y)
    if len(set(y.tolist())) < 2:
        raise InputError("evaluate: image reliance needs samples of at least two labels")
    out = []
    for i in range(len(y)):
        others = np.flatnonzero(y != y[i])
        out.append(int(others[rng.integers(len(others))]))
    return out


def image_reliance(predict: Predict, records: list[dict], labels: Sequence[str], permutations: int, seed: int,
                   blank, base_pred: list | None = None) -> dict:
    """F1 with a blank image and with swapped images; ignore rate; perceptual score.

    ignore_rate: share of samples whose predicted label stays the same when the image is swapped for
    one of another label (mean over the `permutations` swaps); perceptual score: F1 minus the mean F1
    under those swaps. Every swap gives each sample an image of another label (a plain permutation
    leaves about a third of the samples with a same-label image, which dilutes both figures).
    """
    if permutations < 1:
        raise InputError("evaluate.permutations must be at least 1")
    y = [r["label"] for r in records]
    images = [r["image"] for r in records]
    pred = base_pred if base_pred is not None else predict(records, images)
    f1 = f1_macro(y, pred, labels)
    f1_blank = f1_macro(y, predict(records, [blank] * len(records)), labels)
    rng = np.random.default_rng([seed, 11])
    f1s, same = [], []
    for _ in range(permutations):
        swap = other_label_swaps(y, rng)
        p = predict(records, [images[j] for j in swap])
        f1s.append(f1_macro(y, p, labels))
        same.append(np.mean([a == b for a, b in zip(p, pred)]))
    return {
        "f1_blank_image": f1_blank,
        "f1_shuffled_image": float(np.mean(f1s)),
        "ignore_rate": float(np.mean(same)),
        "perceptual_score": float(f1 - np.mean(f1s)),
        "perceptual_score_sd": float(np.std(f1s)),
        "permutations": permutations,
    }


# ----------------------------------------------------------------------------------------- geometry
def auroc(positive: Sequence[bool], score: Sequence[float]) -> float | None:
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.asarray(score, float)))


def retrieval(v: np.ndarray, t: np.ndarray, captions: Sequence[str], ks=(1, 5)) -> dict:
    """R@k both ways on L2-normalised (N, D) embeddings; identical captions count as the same target."""
    sim = v @ t.T
    same = np.array([[a == b for b in captions] for a in captions])
    out = {}
    for name, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        order = np.argsort(-s, axis=1, kind="stable")
        hit = np.take_along_axis(same, order, axis=1)
        out[name] = {f"r@{k}": float(hit[:, :k].any(1).mean()) for k in ks}
    for k in ks:
        out[f"r@{k}"] = (out["image_to_text"][f"r@{k}"] + out["text_to_image"][f"r@{k}"]) / 2
    return out


def geometry(v: np.ndarray, t: np.ndarray) -> dict:
    """Modality gap (‖mean image − mean text‖), alignment (E‖v−t‖² of pairs) and uniformity
    (log E exp(−2‖x−y‖²) over distinct pairs, per modality), on L2-normalised embeddings."""

    def uniformity(x):
        d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
        iu = np.triu_indices(len(x), 1)
        return float(np.log(np.exp(-2 * d2[iu]).mean())) if len(iu[0]) else None

    return {
        "modality_gap": float(np.linalg.norm(v.mean(0) - t.mean(0))),
        "alignment": float(((v - t) ** 2).sum(1).mean()),
        "uniformity_image": uniformity(v),
        "uniformity_text": uniformity(t),
    }


# --------------------------------------------------------------------------------------------- bias
def group_metrics(y_true: Sequence[str], y_pred: Sequence, positive: str) -> dict:
    """macro-F1 over the labels present in y_true (scikit-learn's `f1_score(labels=present,
    average='macro', zero_division=0)`) and recall of the positive class, for one group; in numpy,
    since the bootstrap calls it thousands of times."""
    y, p = np.asarray(y_true, object), np.asarray(_clean(y_pred), object)
    f1s = []
    for label in sorted(set(y.tolist())):
        t, q = y == label, p == label
        tp, denom = np.sum(t & q), 2 * np.sum(t & q) + np.sum(~t & q) + np.sum(t & ~q)
        f1s.append(2 * tp / denom if denom else 0.0)
    pos = y == positive
    recall = float(np.sum(pos & (p == positive)) / np.sum(pos)) if pos.any() else None
    return {"f1_macro": float(np.mean(f1s)) if f1s else 0.0, f"recall_{positive}": recall}


def bias(y_true: Sequence[str], y_pred: Sequence, groups: Sequence[str], positive: str, cfg: config.Bias,
         seed: int) -> dict:
    """Per-group n, macro-F1 and recall of the positive label, each with a bootstrap interval; the largest
    macro-F1 gap and the largest positive-recall gap (equal opportunity) among groups of sufficient size,
    each with a seeded bootstrap interval (resampling within each group)."""
    y, p, g = np.asarray(y_true, object), np.asarray(_clean(y_pred), object), np.asarray(groups, object)
    rkey = f"recall_{positive}"
    table, members = {}, {}
    for name in sorted(set(g.tolist())):
        idx = np.flatnonzero(g == name)
        members[name] = idx
        table[name] = {"n": int(len(idx)), "n_positive": int(np.sum(y[idx] == positive)),
                       **group_metrics(y[idx], p[idx], positive), "insufficient": bool(len(idx) < cfg.min_group_size)}
    names = [k for k, v in table.items() if not v["insufficient"]]
    out = {"groups": table, "insufficient": sorted(k for k, v in table.items() if v["insufficient"]),
           "confidence": cfg.confidence, "max_gap": None, "max_gap_ci": None, f"max_gap_{rkey}": None, "max_gap_recall_ci": None}
    rng = np.random.default_rng([seed, 13])
    boot: dict[str, list[tuple[float, float | None]]] = {k: [] for k in table}
    for _ in range(cfg.bootstrap):
        for name, idx in members.items():
            b = idx[rng.integers(len(idx), size=len(idx))]
            gm = group_metrics(y[b], p[b], positive)
            boot[name].append((gm["f1_macro"], gm[rkey]))
    alpha = (1 - cfg.confidence) / 2

    def interval(values: list[float]) -> list[float] | None:
        return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))] if values else None

    for name, row in table.items():
        row["f1_macro_ci"] = interval([f for f, _ in boot[name]])
        row[f"{rkey}_ci"] = interval([r for _, r in boot[name] if r is not None]) if row[rkey] is not None else None
    if len(names) < 2:
        return out
    f1s = [table[k]["f1_macro"] for k in names]
    out["max_gap"] = float(max(f1s) - min(f1s))
    out["max_gap_groups"] = [names[int(np.argmax(f1s))], names[int(np.argmin(f1s))]]
    out["max_gap_ci"] = interval([max(boot[k][i][0] for k in names) - min(boot[k][i][0] for k in names)
                                  for i in range(cfg.bootstrap)])
    judged = [k for k in names if table[k][rkey] is not None]  # groups holding the positive label
    if len(judged) >= 2:
        recalls = [table[k][rkey] for k in judged]
        out[f"max_gap_{rkey}"] = float(max(recalls) - min(recalls))
        out["max_gap_recall_groups"] = [judged[int(np.argmax(recalls))], judged[int(np.argmin(recalls))]]
        gaps = []
        for i in range(cfg.bootstrap):
            vals = [boot[k][i][1] for k in judged if boot[k][i][1] is not None]
            if len(vals) >= 2:
                gaps.append(max(vals) - min(vals))
        out["max_gap_recall_ci"] = interval(gaps)
    return out


# -------------------------------------------------------------------------------------------- gates
def gates(m: dict, cfg: config.Gates, bias_cfg: config.Bias) -> dict:
    """Each gate: value, threshold, passed (a missing value fails, with the reason)."""
    b = m["bias"]
    ci_hi = b["max_gap_ci"][1] if b.get("max_gap_ci") else None
    out = {
        "min_f1_macro": _gate(m["f1_macro"], cfg.min_f1_macro, ">="),
        "max_ignore_rate": _gate(m["image_reliance"]["ignore_rate"], cfg.max_ignore_rate, "<="),
        "max_bias_gap": _gate(ci_hi, cfg.max_bias_gap, "<="),
        "min_mismatch_auroc": _gate(m.get("mismatch_auroc"), cfg.min_mismatch_auroc, ">="),
    }
    if cfg.max_recall_gap is not None:  # equal opportunity: recall of data.positive_label across groups
        rec = b.get("max_gap_recall_ci")
        out["max_recall_gap"] = _gate(rec[1] if rec else None, cfg.max_recall_gap, "<=")
        if rec is None:
            out["max_recall_gap"]["note"] = "fewer than two groups of sufficient size hold the positive label"
        elif b["insufficient"] and bias_cfg.insufficient == "fail":
            out["max_recall_gap"]["passed"] = False
            out["max_recall_gap"]["note"] = f"groups under {bias_cfg.min_group_size} samples: {b['insufficient']}"
    if b["insufficient"]:
        note = f"groups under {bias_cfg.min_group_size} samples: {b['insufficient']}"
        out["max_bias_gap"]["note"] = note
        if bias_cfg.insufficient == "fail":
            out["max_bias_gap"]["passed"] = False
    if ci_hi is None:
        out["max_bias_gap"]["note"] = out["max_bias_gap"].get("note", "fewer than two groups of sufficient size")
    return out


def _gate(value, threshold: float, op: str) -> dict:
    passed = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    return {"value": value, "threshold": threshold, "op": op, "passed": bool(passed)}


def failed_gates(g: dict) -> list[str]:
    return [f"{k}: {v['value']} (needs {v['op']} {v['threshold']}){' - ' + v['note'] if v.get('note') else ''}"
            for k, v in g.items() if not v["passed"]]


# ------------------------------------------------------------------------------------- the model
@contextmanager
def left_padding(tok):
    """Padding on the left while generating (generation appends to the right end of every row); the
    tokenizer's side and its backend's padding state as they were afterwards (a padded call leaves the
    backend's set, and a processor saved later would carry it)."""
    side, backend = tok.padding_side, getattr(tok, "_tokenizer", None)
    padding = backend.padding if backend is not None else None
    tok.padding_side = "left"
    try:
        yield
    finally:
        tok.padding_side = side
        if backend is not None:
            backend.no_padding() if padding is None else backend.enable_padding(**padding)


@dataclass
class Evaluator:
    """The base model with the adapter, its alignment heads and processor, ready to generate and embed."""

    model: object
    processor: object
    heads: object
    meta: dict
    device: object
    max_new_tokens: int
    batch_size: int
    label_pattern: str
    labels: tuple[str, ...]

    @classmethod
    def load(cls, adapter: Path, params: config.Params, who: str = "evaluate") -> "Evaluator":
        import torch

        from pipeline import model as modelmod

        m = modelmod.load_adapter(adapter, params, who)
        m.processor.tokenizer.padding_side = "left"  # generation appends to the right end of every row
        torch.manual_seed(params.evaluate.seed)
        e = params.evaluate
        return cls(m.model, m.processor, m.heads, m.meta, m.device, e.max_new_tokens, e.batch_size,
                   params.data.label_pattern, tuple(m.meta.get("labels", params.data.labels)))

    # ---- generation
    def generate(self, records: list[dict], images: list | None = None) -> list[str]:
        """Greedy answers for `records`, with `images` in place of the records' own if given."""
        return self.generate_scored(records, images)[0]

    def generate_scored(self, records: list[dict], images: list | None = None) -> tuple[list[str], np.ndarray]:
        """(greedy answers, each answer's mean token log-probability: the model's confidence in it)."""
        import torch

        from pipeline.collate import open_image

        images = images if images is not None else [r["image"] for r in records]
        tok = self.processor.tokenizer
        eos = [tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id]
        out: list[str] = []
        confidence: list[np.ndarray] = []
        with left_padding(tok):
            for i in range(0, len(records), self.batch_size):
                chunk = records[i : i + self.batch_size]
                prompts = [self.processor.apply_chat_template([m for m in r["messages"] if m["role"] != "assistant"],
                                                              tokenize=False, add_generation_prompt=True) for r in chunk]
                imgs = [[open_image(im)] for im in images[i : i + self.batch_size]]
                enc = self.processor(text=prompts, images=imgs, return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(self.device) for k, v in enc.items()}
                with torch.no_grad():
                    gen = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                              eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                              output_scores=True, return_dict_in_generate=True)
                    step_lp = self.model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
                new = gen.sequences[:, enc["input_ids"].shape[1]:]
                keep = (new != tok.pad_token_id).float()  # tokens after the end of an answer are padding
                confidence.append(((step_lp.float() * keep).sum(1) / keep.sum(1).clamp(min=1)).cpu().numpy())
                out += tok.batch_decode(new, skip_special_tokens=True)
        return [o.strip() for o in out], (np.concatenate(confidence) if confidence else np.zeros(0))

    def predict(self, records: list[dict], images: list | None = None) -> list[str | None]:
        return [chat.parse_label(a, self.label_pattern, self.labels) for a in self.generate(records, images)]

    # ---- embeddings and likelihood
    def _batches(self, records: list[dict]):
        from pipeline.collate import Collator
        from pipeline.model import to_device

        collator = Collator(self.processor, max_length=10**6)
        for i in range(0, len(records), self.batch_size):
            yield to_device(collator(records[i : i + self.batch_size]), self.device)

    def embed(self, records: list[dict], likelihood: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image embeddings, caption embeddings, answer mean log-likelihood) per record; the caption is
        read as in training (frozen base LM unless the adapter was trained with text_grad). Without
        `likelihood` the multimodal forward pass is skipped and the third array is empty."""
        import torch
        import torch.nn.functional as F

        from pipeline.model import TextAnchor, backbone

        anchor = TextAnchor()
        vs, ts, lls = [], [], []
        base = backbone(self.model)
        with torch.no_grad():
            for b in self._batches(records):
                image_out = base.model.get_image_features(b["pixel_values"], return_dict=True)
                vs.append(self.heads.embed_image(image_out.pooler_output.float()))
                if self.meta.get("text_grad"):
                    h = base.model.language_model(input_ids=b["caption_ids"],
                                                  attention_mask=b["caption_attention"]).last_hidden_state
                    ts.append(self.heads.embed_text(h.float(), b["caption_mask"]))
                else:
                    ts.append(self.heads.embed_pooled(anchor(self.model, b)))
                if not likelihood:
                    continue
                out = base.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 token_type_ids=b["token_type_ids"], mm_encoder_outputs={"image": image_out})
                hidden, labels = out.last_hidden_state[:, :-1], b["labels"][:, 1:]
                logits = base.lm_head(hidden).float()
                cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                keep = labels != -100
                lp = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                lls.append((lp * keep).sum(1) / keep.sum(1).clamp(min=1))
        cat = lambda xs: torch.cat(xs).cpu().numpy().astype(np.float64) if xs else np.zeros(0)  # noqa: E731
        return cat(vs), cat(ts), cat(lls)


# ------------------------------------------------------------------------------------------- runs
def check_records(records: list[dict], labels: Sequence[str], name: str, who: str = "evaluate") -> None:
    if not records:
        raise InputError(f"{who}: evaluation set {name!r} is empty")
    for i, r in enumerate(records):
        if r.get("label") not in labels:
            raise InputError(f"{who}: set {name!r} row {i} (id {r.get('id')}): label {r.get('label')!r} "
                             f"is not one the model was trained on {list(labels)}")


def blank_image(params: config.Params):
    from PIL import Image

    s = params.model.image_size
    v = params.evaluate.blank_value
    return Image.new("RGB", (s, s), (v, v, v))


def evaluate_set(ev, records: list[dict], params: config.Params, name: str,
                 full: bool = True) -> tuple[dict, list[dict]]:
    """The metrics of one evaluation set, and its per-sample predictions. `full=False` (the extra sets):
    accuracy and F1 only; image reliance, geometry and bias are computed on the test split."""
    labels, e = ev.labels, params.evaluate
    check_records(records, labels, name)
    answers = ev.generate(records)
    pred = [chat.parse_label(a, ev.label_pattern, labels) for a in answers]
    y = [r["label"] for r in records]
    refs = [chat.answer(r["messages"]).strip() for r in records]
    m = classification(y, pred, labels)
    m["n"] = len(records)
    m["unparseable"] = {"count": sum(p is None for p in pred),
                        "ids": [r["id"] for r, p in zip(records, pred) if p is None][:50]}
    m["clinically_acceptable"] = clinically_acceptable(refs, answers, y, pred, e.attributes)
    group_key = params.data.subgroups[0] if params.data.subgroups else None
    groups = [str((r.get("subgroups") or {}).get(group_key, "unknown")) for r in records]
    rows = [{"id": r["id"], "label": yy, "prediction": p, "answer": a, "subgroup": g, "correct": p == yy}
            for r, yy, p, a, g in zip(records, y, pred, answers, groups)]
    if not full:
        return m, rows
    m["image_reliance"] = image_reliance(ev.predict, records, labels, e.permutations, e.seed, blank_image(params),
                                         base_pred=pred)
    v, t, _ = ev.embed(records)
    m["retrieval"] = retrieval(v, t, refs)
    m.update(geometry(v, t))
    if group_key:
        binned = [e.bias.groups.get(g, g) for g in groups]  # e.g. Fitzpatrick I-II / III-IV / V-VI
        m["bias"] = bias(y, pred, binned, params.data.positive_label, e.bias, e.seed)
        if e.bias.groups:  # the unbinned values too, for the record (no interval, no gate)
            y_, p_, g_ = np.asarray(y, object), np.asarray(_clean(pred), object), np.asarray(groups, object)
            m["bias"]["per_value"] = {v: {"n": int((g_ == v).sum()), **group_metrics(y_[g_ == v], p_[g_ == v],
                                                                                   params.data.positive_label)}
                                      for v in sorted(set(groups))}
    else:
        m["bias"] = {}
    m["bias"]["subgroup"] = group_key
    return m, rows


def mismatch_robustness(ev, records: list[dict]) -> dict:
    """AUROC of the alignment score (cosine) and of the answer log-likelihood for matched vs swapped."""
    matched = [not r.get("mismatched", False) for r in records]
    v, t, ll = ev.embed(records)
    cos = (v * t).sum(1)
    return {"mismatch_auroc": auroc(matched, cos), "mismatch_auroc_loglik": auroc(matched, ll),
            "n_pairs": len(records), "n_mismatched": int(len(records) - sum(matched))}


def evaluate_adapter(adapter: Path, sets: dict[str, list[dict]], mismatch: list[dict] | None,
                     params: config.Params) -> tuple[dict, dict[str, list[dict]]]:
    """All metrics for an adapter: the primary set ('test') at the top level, others under `sets`."""
    ev = Evaluator.load(adapter, params)
    per_set, predictions = {}, {}
    for name, records in sets.items():
        per_set[name], predictions[name] = evaluate_set(ev, records, params, name, full=name == "test")
    metrics = dict(per_set["test"]) if "test" in per_set else {}
    if mismatch:
        metrics.update(mismatch_robustness(ev, mismatch))
    else:
        metrics["mismatch_auroc"] = None
    metrics["gates"] = gates(metrics, params.evaluate.gates, params.evaluate.bias)
    metrics["passed"] = all(g["passed"] for g in metrics["gates"].values())
    metrics["sets"] = {k: {kk: per_set[k][kk] for kk in ("n", "f1_macro", "accuracy", "f1_per_class")}
                       for k in per_set}
    return metrics, predictions


def load_sets(params: config.Params) -> tuple[dict[str, list[dict]], list[dict] | None]:
    split = Path(params.paths.split)
    test = split / "test.jsonl"
    if not test.is_file():
        raise InputError(f"evaluate: {test} not found (run split first)")
    sets = {"test": dataio.read_jsonl(test)}
    for name, path in params.evaluate.sets.items():
        if name == "test":
            raise InputError("evaluate.sets: the name 'test' is reserved for the test split")
        if not Path(path).is_file():
            raise InputError(f"evaluate.sets.{name}: {path} not found")
        sets[name] = dataio.read_jsonl(Path(path))
    check_evaluate_params(params, [r for n in ("train", "val", "test") if (split / f"{n}.jsonl").is_file()
                                   for r in dataio.read_jsonl(split / f"{n}.jsonl")], split)
    mm = split / "val_mismatch.jsonl"
    return sets, dataio.read_jsonl(mm) if mm.is_file() else None


def check_evaluate_params(params: config.Params, records: list[dict], where: Path) -> None:
    """`evaluate` params against the split (train, val, test), before any model is loaded (exit 2): bias
    groups none of whose subgroup values the data holds, and evaluation attributes of which no caption
    states any: the settings of another dataset. Some values or terms absent (a clinic without type VI
    patients) is a warning, not an error."""
    import warnings

    e, key = params.evaluate, (params.data.subgroups[0] if params.data.subgroups else None)
    if e.bias.groups:
        if key is None:
            raise InputError("evaluate.bias.groups: set, but data.subgroups is empty (nothing to group)")
        values = sorted({str((r.get("subgroups") or {}).get(key, "unknown")) for r in records})
        unknown = sorted(set(e.bias.groups) - set(values))
        if len(unknown) == len(e.bias.groups):
            raise InputError(f"evaluate.bias.groups: none of the values {unknown} of subgroup {key!r} occurs in "
                             f"{where}; it holds {values}")
        if unknown:
            warnings.warn(f"evaluate.bias.groups: values {unknown} of subgroup {key!r} do not occur in {where}")
    if e.attributes:
        stated = set().union(*(attribute_terms(chat.answer(r["messages"]), e.attributes) for r in records))
        never = [t for t in e.attributes if t not in stated]
        if len(never) == len(e.attributes):
            raise InputError(f"evaluate.attributes: none of {never} occurs in any caption of {where}")
        if never:
            warnings.warn(f"evaluate.attributes: {never} occur in no caption of {where}")
