"""Row, image and dataset checks: what `curate` runs on every manifest row, and what `monitor` and
`ingest` reuse on incoming batches.

Checks run in this order; a row collects every reason that applies:
fields and encoding -> duplicate id (within its source) -> label -> caption (missing, length, vagueness,
conflict with the label) -> image file (path inside the dataset, exists, non-empty, decodes under the
pixel limit, size bounds) -> exact and near duplicates among the rows still clean -> image-text mismatch
among those.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import chat, data as dataio, mismatch
from pipeline.config import Curate, Data
from pipeline.errors import InputError


@dataclass
class Row:
    """One manifest row on its way through the checks."""

    index: int
    raw: dict[str, str]
    reasons: list[str] = field(default_factory=list)
    path: Path | None = None
    sha256: str = ""
    phash: np.ndarray | None = None  # (4,) uint64: 256-bit perceptual hash
    features: np.ndarray | None = None  # the mismatch detector's frozen image features (`model: features`)
    quality: dict = field(default_factory=dict)


@dataclass
class Result:
    accepted: list[dict]
    quarantined: list[dict]
    report: dict


# ------------------------------------------------------------------------------------------ row checks
def check_fields(row: Row, has_label: bool) -> None:
    for name in ("id", "image"):
        if not row.raw.get(name, "").strip():
            row.reasons.append(f"missing_field:{name}")
    if has_label and not row.raw.get("label", "").strip():
        row.reasons.append("missing_field:label")
    if any(_has_surrogates(v) for v in row.raw.values()):
        row.reasons.append("bad_encoding")
    if dataio.EXTRA in row.raw:
        row.reasons.append("malformed_row")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def check_label(row: Row, labels: tuple[str, ...]) -> None:
    label = row.raw.get("label", "").strip()
    if label and label not in labels:
        row.reasons.append("unknown_label")


def specificity(caption: str, cfg: Curate) -> tuple[int, int]:
    """(words, visual-feature terms) left once the vague phrases are taken out."""
    text = caption.lower()
    for phrase in cfg.vague_phrases:
        text = re.sub(rf"\b{re.escape(phrase.lower())}\b", " ", text)
    words = re.findall(r"[a-z][a-z'-]*", text)
    terms = sum(1 for t in cfg.visual_terms if re.search(rf"\b{re.escape(t.lower())}\b", text))
    return len(words), terms


def check_caption(row: Row, cfg: Curate, data: Data) -> None:
    caption = row.raw.get("caption", "")
    if not caption.strip():
        row.reasons.append("missing_caption")
        return
    if len(caption) > cfg.max_caption_chars:
        row.reasons.append("caption_too_long")
        return
    words, terms = specificity(caption, cfg)
    row.quality["specificity"] = terms
    if words < cfg.min_words or terms < 1:
        row.reasons.append("vague_caption")
    stated = chat.parse_label(caption, data.label_pattern, data.labels)
    label = row.raw.get("label", "").strip()
    if stated and label in data.labels and stated != label:
        row.reasons.append("label_conflict")


def resolve_inside(root: Path, rel: str) -> Path | None:
    """The image path if it stays inside the dataset folder (after symlinks), else None."""
    if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def check_image(row: Row, root: Path, cfg: Curate) -> None:
    """File checks, then the header (pixel limit), then a full decode; sets sha256, phash and (for the
    `features` mismatch detector) the image's features, from the one decode."""
    rel = row.raw.get("image", "").strip()
    if not rel:
        return
    path = resolve_inside(root, rel)
    if path is None:
        row.reasons.append("path_outside_dataset")
        return
    if not path.is_file():
        row.reasons.append("missing_image")
        return
    payload = path.read_bytes()
    if not payload:
        row.reasons.append("empty_file")
        return
    row.path, row.sha256 = path, hashlib.sha256(payload).hexdigest()
    reason = _decode(row, path, cfg)
    if reason:
        row.reasons.append(reason)


@contextlib.contextmanager
def own_pixel_limit():
    """PIL's decompression-bomb limit off while we enforce our own from the header (before decoding);
    restored afterwards, so that nothing else in the process loses it."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _decode(row: Row, path: Path, cfg: Curate) -> str | None:
    try:
        with own_pixel_limit(), Image.open(path) as img:
            w, h = img.size
            if w * h > cfg.max_pixels or max(w, h) > cfg.max_side:
                return "image_too_large"
            if min(w, h) < cfg.min_side:
                return "image_too_small"
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # PIL warns instead of failing on some broken files
                img.load()
            rgb = img.convert("RGB")
            row.phash = phash(rgb)
            if wants_features(cfg):
                row.features = mismatch.image_features(rgb, cfg.mismatch.feature_size)
    except UnidentifiedImageError:
        return "not_an_image"
    except (OSError, SyntaxError, ValueError, Warning, Image.DecompressionBombError):
        return "unreadable_image"
    return None


def wants_features(cfg: Curate) -> bool:
    m = cfg.mismatch
    return m.enabled and m.model == "features" and not m.pretrained


# ------------------------------------------------------------------------------ image checks in workers
CHUNK = 64  # rows a task
CRASHED = "unreadable_image"  # the reason of a row whose image took its worker process down
_WORKER: dict = {}


def _init_worker(cfg: Curate) -> None:
    _WORKER["cfg"] = cfg
    try:
        from threadpoolctl import threadpool_limits

        _WORKER["limits"] = threadpool_limits(1)  # the processes are the parallelism
    except ImportError:  # pragma: no cover - sklearn brings threadpoolctl
        pass


def _check_chunk(jobs: list[tuple[int, str, str]]) -> list[tuple[int, tuple]]:
    out = []
    for index, root, rel in jobs:
        row = Row(index=index, raw={"image": rel})
        check_image(row, Path(root), _WORKER["cfg"])
        out.append((index, (row.reasons, row.path, row.sha256, row.phash, row.features)))
    return out


def check_images(rows: list[Row], roots: list[Path], cfg: Curate) -> None:
    """`check_image` on every row, in `cfg.workers` processes (0: all cores), 64 rows a task, at most one
    task a worker in flight (memory: a worker's images are never held beyond their own check). A worker
    that dies (a decoder crash) costs only the row that killed it: the tasks in flight are re-run one at a
    time and split in halves until the row is found, which is quarantined as `unreadable_image`."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    jobs = [(i, str(root), row.raw.get("image", "").strip()) for i, (row, root) in enumerate(zip(rows, roots))]
    results: dict[int, tuple] = {}
    todo = deque(jobs[a : a + CHUNK] for a in range(0, len(jobs), CHUNK))
    suspects: deque = deque()  # tasks that were in flight when a worker died: re-run alone, halved on failure
    workers = max(1, cfg.workers or os.cpu_count() or 1)
    ctx = multiprocessing.get_context("fork")  # the workers inherit the loaded modules: no re-import
    while todo or suspects:
        alone = not todo
        queue, width = (suspects, 1) if alone else (todo, min(workers, len(todo)))
        with ProcessPoolExecutor(width, mp_context=ctx, initializer=_init_worker, initargs=(cfg,)) as ex:
            running: dict = {}
            broken = False
            while (queue or running) and not broken:
                while queue and len(running) < width:
                    task = queue.popleft()
                    running[ex.submit(_check_chunk, task)] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = running.pop(fut)
                    try:
                        results.update(fut.result())
                    except BrokenProcessPool:
                        broken = True
                        if not alone:
                            suspects.append(task)
                        elif len(task) == 1:
                            results[task[0][0]] = ([CRASHED], None, "", None, None)
                        else:
                            suspects.extendleft([task[len(task) // 2 :], task[: len(task) // 2]])
            suspects.extend(running.values())  # in flight when the pool broke: suspects too
    for i, row in enumerate(rows):
        reasons, path, sha, ph, feats = results[i]
        row.reasons += reasons
        row.path, row.sha256, row.phash, row.features = path, sha, ph, feats


def phash(img: Image.Image) -> np.ndarray:
    """256-bit DCT perceptual hash (imagehash, hash_size 16) packed as (4,) uint64.

    The common 64-bit hash cannot tell distinct objects on a similar even background apart (most of each
    image is skin, or a conveyor belt).
    """
    import imagehash

    bits = imagehash.phash(img, hash_size=16).hash.flatten()
    return np.packbits(bits).view(">u8").astype(np.uint64)


# ---------------------------------------------------------------------------------------- dataset checks
def mark_duplicates(rows: list[Row], max_bits: int, confirm: float = 0.0) -> None:
    """Exact (sha256) then near (256-bit phash Hamming distance <= max_bits) duplicates: the first member of
    each group stays, the others get `duplicate_of:<id>`. `confirm` > 0: a pHash pair is a near duplicate
    only if its two pictures also differ by at most `confirm` (`aligned_difference`), so that distinct
    objects of one shape on a uniform background (which the hash, built from low frequencies, cannot tell
    apart) are not taken for copies."""
    clean = [r for r in rows if not r.reasons]
    first: dict[str, Row] = {}  # sha256 -> the first clean row with those bytes
    keepers: list[Row] = []
    for r in clean:
        if r.sha256 in first:
            r.reasons.append(f"duplicate_of:{sample_id(first[r.sha256].raw)}")
        else:
            first[r.sha256] = r
            keepers.append(r)
    if max_bits < 0 or len(keepers) < 2:
        return
    hashes = np.stack([r.phash for r in keepers])  # (N, 4)
    later: dict[int, list[int]] = {}
    thumbs: dict[int, np.ndarray] = {}

    def thumb(k: int) -> np.ndarray:
        if k not in thumbs:
            thumbs[k] = thumbnail(keepers[k].path)
        return thumbs[k]

    for i, j in near_pairs(hashes, max_bits):
        if confirm > 0 and aligned_difference(thumb(int(i)), thumb(int(j))) > confirm:
            continue
        later.setdefault(int(i), []).append(int(j))
    for i, r in enumerate(keepers):  # the first of a group keeps, in manifest order, as an exhaustive scan would
        if r.reasons:
            continue
        for j in later.get(i, ()):
            other = keepers[j]
            if not other.reasons:
                other.reasons.append(f"duplicate_of:{sample_id(r.raw)}")


THUMB = 64  # side of the grey thumbnails that confirm a near duplicate
MAX_SHIFT = 2  # pixels of the thumbnail: a copy may be cropped or shifted by a few pixels


def thumbnail(path: Path) -> np.ndarray:
    """The picture in grey at THUMB x THUMB, standardised (mean 0, sd 1: a brighter or more contrasted copy
    is still a copy; orientation as stored: a rotated copy is not)."""
    with own_pixel_limit(), Image.open(path) as img:
        g = np.asarray(img.convert("L").resize((THUMB, THUMB), Image.BILINEAR), np.float32)
    return (g - g.mean()) / max(float(g.std()), 1e-3)


def aligned_difference(a: np.ndarray, b: np.ndarray, max_shift: int = MAX_SHIFT) -> float:
    """Mean absolute difference of two thumbnails at the shift (up to `max_shift` pixels each way) that
    matches them best, over the centre both cover at every shift, in standard deviations of the picture. A
    re-encoded, resized or slightly shifted copy stays within the codec's noise; two photos of distinct
    objects differ by their texture, marks and outline wherever the hash cannot see them."""
    n, k = a.shape[0], max_shift
    centre = a[k:n - k, k:n - k]
    return min(float(np.abs(centre - b[k + dy:n - k + dy, k + dx:n - k + dx]).mean())
               for dy in range(-k, k + 1) for dx in range(-k, k + 1))


def near_pairs(hashes: np.ndarray, max_bits: int) -> np.ndarray:
    """(P, 2) index pairs i < j (sorted) of the (N, 4) uint64 256-bit hashes within Hamming distance
    `max_bits`, without comparing every pair: multi-index hashing (Norouzi et al. 2012). The 256 bits are cut
    into `max_bits + 1` disjoint chunks; by the pigeonhole principle two hashes within `max_bits` agree
    exactly on at least one chunk, so only pairs that share a chunk value are compared. The same pairs as an
    exhaustive search, in ~N * (N / 2^chunk bits) comparisons instead of N^2 / 2."""
    n = len(hashes)
    if n < 2 or max_bits < 0:
        return np.zeros((0, 2), np.int64)
    words = np.ascontiguousarray(hashes, dtype=np.uint64)
    if max_bits >= 256:
        i, j = np.triu_indices(n, 1)
        return np.stack([i, j], 1).astype(np.int64)
    bits = np.unpackbits(words.view(np.uint8), axis=1)  # (N, 256)
    # any partition of the bits works; dealing them out by balance (share of ones nearest 1/2 first,
    # round-robin) spreads the informative bits over the chunks, so that no chunk is nearly constant
    # (a pHash of similar pictures has many) and the buckets stay small
    m = max_bits + 1
    order_bits = np.argsort(np.abs(bits.mean(0) - 0.5), kind="stable")
    bits = bits[:, np.concatenate([order_bits[c::m] for c in range(m)])]
    edges = np.cumsum([0] + [len(order_bits[c::m]) for c in range(m)])
    found: list[np.ndarray] = []
    for a, b in zip(edges[:-1], edges[1:]):
        keys = bits[:, a:b].astype(np.int64) @ (1 << np.arange(b - a, dtype=np.int64))
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        for d in range(1, n):  # pairs (k, k + d) of the sorted keys inside one run of equal keys
            same = np.flatnonzero(sk[d:] == sk[:-d])
            if not len(same):
                break
            i, j = order[same], order[same + d]
            i, j = np.minimum(i, j), np.maximum(i, j)
            dist = np.bitwise_count(words[i] ^ words[j]).sum(1)
            keep = dist <= max_bits
            if keep.any():
                found.append(i[keep] * n + j[keep])
    if not found:
        return np.zeros((0, 2), np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], 1)


def mark_mismatches(rows: list[Row], cfg: Curate) -> dict:
    """Score the clean pairs with the secondary image-text model; flag `likely_mismatch`.

    Each source (the raw dataset, each ingested batch) is scored by its own cross-fitted detector, so a
    site's camera is never mistaken for a mismatch and an unchanged source is not scored again: scores
    are cached by content (`mismatch.cached_scores`), and a re-run after `ingest` scores only the batch."""
    clean = [r for r in rows if not r.reasons]
    if not cfg.mismatch.enabled:
        return {"scored": 0, "flagged": 0, "skipped": "disabled"}
    sources: dict[str, list[Row]] = {}
    for r in clean:
        sources.setdefault(r.raw.get(ROOT_KEY, ""), []).append(r)
    report = {"scored": 0, "flagged": 0, "score": cfg.mismatch.score, "model": cfg.mismatch.model,
              "rule": "top_fraction" if cfg.mismatch.top_fraction is not None else cfg.mismatch.rule, "sources": {}}
    for name, group in sources.items():
        key = Path(name).name if name else "raw"
        if len(group) < 2 * cfg.mismatch.folds:
            report["sources"][key] = {"scored": 0, "flagged": 0, "skipped": "too few rows"}
            continue
        feats = np.stack([r.features for r in group]) if wants_features(cfg) else None
        scores = mismatch.cached_scores([str(r.path) for r in group], [r.raw["caption"] for r in group], cfg.mismatch,
                                        digests=[r.sha256 for r in group], features=feats)
        flag = scores.flags(cfg.mismatch)
        for i, r in enumerate(group):
            r.quality.update(
                clip_cosine=round(float(scores.cosine[i]), 6), clip_csls=round(float(scores.csls[i]), 6),
                mismatch_score=round(float(scores.mismatch_score[i]), 6), mismatch_fold=int(scores.fold[i]),
            )
            if scores.preferred is not None:
                r.quality["mismatch_preferred"] = round(float(scores.preferred[i]), 6)
            if flag[i]:
                r.reasons.append("likely_mismatch")
        report["sources"][key] = {"scored": len(group), "flagged": int(flag.sum())}
        report["scored"] += len(group)
        report["flagged"] += int(flag.sum())
    if not report["scored"]:
        report["skipped"] = "too few rows"
    return report


def sample_id(raw: dict[str, str]) -> str:
    """The id in curated samples and reports: the manifest's id, prefixed by its batch for a row of an
    ingested batch (`<batch>/<id>`), so that two sources may use the same ids."""
    rid = raw.get("id", "").strip()
    return f"{Path(raw[ROOT_KEY]).name}/{rid}" if ROOT_KEY in raw else rid


def image_hashes(paths: list[Path], skip_unreadable: bool = False) -> tuple[list[str], np.ndarray]:
    """(sha256 of each file, (N, 4) 256-bit perceptual hashes); with `skip_unreadable`, files that do not
    decode are left out (else they raise)."""
    shas, hashes = [], []
    for path in paths:
        try:
            with own_pixel_limit(), Image.open(path) as img:
                h = phash(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
            if skip_unreadable:
                continue
            raise
        shas.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        hashes.append(h)
    return shas, np.stack(hashes) if hashes else np.zeros((0, 4), np.uint64)


def duplicates_of(ref: tuple[list[str], np.ndarray], other: tuple[list[str], np.ndarray], max_bits: int) -> np.ndarray:
    """(M,) mask: which of `other`'s images are exact or near (<= max_bits) duplicates of one of `ref`'s."""
    refs = set(ref[0])
    same = np.array([s in refs for s in other[0]], bool)
    if max_bits < 0 or not len(ref[1]) or not len(other[1]):
        return same
    n = len(ref[1])
    pairs = near_pairs(np.concatenate([ref[1], other[1]]), max_bits)
    cross = pairs[(pairs[:, 0] < n) & (pairs[:, 1] >= n)]  # i < j: a reference image, then one of `other`
    near = np.zeros(len(other[1]), bool)
    near[cross[:, 1] - n] = True
    return same | near


def sample_record(row: Row, image_ref: str, data: Data) -> dict:
    """An accepted row in the curated format (docs/design.md §3.2), messages in the chat format (§4)."""
    raw = row.raw
    prompt = raw.get("prompt", "").strip() or data.prompt
    return {
        "id": sample_id(raw), "image": image_ref, "image_sha256": row.sha256,
        "messages": chat.messages(raw["caption"].strip(), prompt, data.system_prompt),
        "label": raw.get("label", "").strip() or None,
        "subgroups": {g: raw.get(g, "").strip() or "unknown" for g in data.subgroups},
        "patient_id": raw.get("patient_id", "").strip() or sample_id(raw),
        "site": raw.get("site", ""), "camera": raw.get("camera", ""), "source": raw.get("source", "") or "real",
        "quality": row.quality,
    }


def quarantine_record(row: Row) -> dict:
    """The row as read (undecodable bytes shown as \\xNN escapes), its manifest row number, its
    reasons and whatever scores were computed before it was rejected."""
    as_read = {k: v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for k, v in row.raw.items()
               if k != ROOT_KEY}
    if ROOT_KEY in row.raw:
        as_read["dataset"] = row.raw[ROOT_KEY]
    return {**as_read, "row": row.index, "reasons": row.reasons, "quality": row.quality}


ROOT_KEY = "__dataset__"  # a row read from another dataset folder (an ingested batch) carries it


def check_data_params(raw_rows: list[dict[str, str]], data: Data, where: str) -> None:
    """The `data` params against what a dataset holds, before any work (exit 2, nothing written): a
    params file of another domain that leaves a default in force names the key and what the data holds.
    Checked: every `data.subgroups` column exists; some rows carry one of `data.labels`; the
    `data.positive_label` is one of them; `data.label_pattern` finds a label in some caption."""
    if not raw_rows:
        return
    columns = sorted({k for r in raw_rows for k in r if k != ROOT_KEY})
    if "label" in columns and not data.labels:
        raise InputError(f"data.labels: empty, but {where} has a label column: list the dataset's labels")
    missing = [g for g in data.subgroups if g not in columns]
    if missing:
        raise InputError(f"data.subgroups: column(s) {missing} not in {where}; its columns are {columns}")
    if data.positive_label and data.positive_label not in data.labels:
        raise InputError(f"data.positive_label: {data.positive_label!r} is not one of data.labels {list(data.labels)}")
    if "label" in columns:
        found = sorted({(r.get("label") or "").strip() for r in raw_rows} - {""})
        if found and not set(found) & set(data.labels):
            raise InputError(f"data.labels: none of {list(data.labels)} occurs in {where}; its labels are {found[:20]}")
    captions = [(r.get("caption") or "") for r in raw_rows]
    if any(captions) and not any(chat.parse_label(c, data.label_pattern, data.labels) for c in captions):
        example = next(c for c in captions if c)
        example = example if len(example) <= 160 else "..." + example[-157:]
        raise InputError(f"data.label_pattern: {data.label_pattern!r} reads none of data.labels out of any caption "
                         f"in {where} (a caption: {example!r})")


def curate_rows(raw_rows: list[dict[str, str]], root: Path, cfg: Curate, data: Data, image_prefix: str = "") -> Result:
    """Curate manifest rows of the dataset at `root`; `image_prefix` is joined to accepted image paths.
    A row with `ROOT_KEY` belongs to that folder instead (its images are resolved and referenced there)."""
    has_label = bool(raw_rows) and "label" in raw_rows[0]
    rows = [Row(index=i, raw=r) for i, r in enumerate(raw_rows)]
    seen: set[tuple[str, str]] = set()
    for row in rows:
        check_fields(row, has_label)
        key = (row.raw.get(ROOT_KEY, ""), row.raw.get("id", ""))  # ids are unique within a source only
        if key[1] and key in seen:
            row.reasons.append("duplicate_id")
        seen.add(key)
        check_label(row, data.labels)
        check_caption(row, cfg, data)
    check_images(rows, [Path(r.raw[ROOT_KEY]) if ROOT_KEY in r.raw else root for r in rows], cfg)
    mark_duplicates(rows, cfg.near_duplicate_bits, cfg.near_duplicate_confirm)
    mism = mark_mismatches(rows, cfg)
    accepted = [sample_record(r, os.path.join(r.raw.get(ROOT_KEY, image_prefix), r.raw["image"].strip()), data)
                for r in rows if not r.reasons]
    quarantined = [quarantine_record(r) for r in rows if r.reasons]
    return Result(accepted, quarantined, _report(rows, accepted, quarantined, mism))


def _report(rows, accepted, quarantined, mism) -> dict:
    reasons: dict[str, int] = {}
    for q in quarantined:
        for code in q["reasons"]:
            key = "duplicate_of" if code.startswith("duplicate_of:") else code
            reasons[key] = reasons.get(key, 0) + 1
    assert len(rows) == len(accepted) + len(quarantined)  # nothing is lost
    return {"rows_in": len(rows), "accepted": len(accepted), "quarantined": len(quarantined),
            "reasons": dict(sorted(reasons.items())), "mismatch": mism}
