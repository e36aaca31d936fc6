"""Reading manifests and JSONL, and writing a stage's outputs all at once or not at all."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from pipeline.errors import InputError

REQUIRED_COLUMNS = ("id", "image", "caption")
EXTRA = "__extra_cells__"
MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "manifest.parquet")


def find_manifest(folder: Path) -> Path:
    """The dataset's manifest (csv, jsonl or parquet); an error names the folder if none."""
    if not folder.is_dir():
        raise InputError(f"dataset folder {folder} does not exist")
    for name in MANIFEST_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise InputError(f"{folder}: no manifest (expected one of {', '.join(MANIFEST_NAMES)})")


def _cell(value) -> str:
    """Every cell as text; missing cells become ''. Undecodable bytes survive as surrogates."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return str(value)


def read_manifest(path: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, str]]:
    """All rows as string dicts, in file order; a manifest unusable as a whole is an InputError.
    (Incoming batches may lack captions: `monitor` requires only id and image.)"""
    try:
        if path.suffix == ".csv":
            return _read_csv(path, required)
        if path.suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            df = pd.read_parquet(path)
    except (OSError, ValueError, csv.Error, ImportError) as e:
        raise InputError(f"{path}: cannot read the manifest ({type(e).__name__}: {e})") from None
    _require_columns(path, [str(c) for c in df.columns], required)
    return [{str(k): _cell(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _require_columns(path: Path, columns: list[str], required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(f"{path}: missing required column(s) {missing}; found {columns}")


def _read_csv(path: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, str]]:
    """CSV rows as text; bytes that are not UTF-8 survive as surrogates (curate flags them), and a
    row with more cells than the header keeps them under EXTRA (curate flags it)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh, restkey=EXTRA, restval="")
        _require_columns(path, list(reader.fieldnames or []), required)
        rows = []
        for row in reader:
            if EXTRA in row:
                row[EXTRA] = "|".join(row[EXTRA])
            rows.append(row)
        return rows


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a bad line is an error naming the file and line."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e})") from None
    return out


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """Stable bytes: sorted keys, UTF-8, one record per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a scratch folder beside `target`; on success it replaces `target`, on error it vanishes.

    A crashed stage therefore leaves either the previous complete output or none, never half.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
