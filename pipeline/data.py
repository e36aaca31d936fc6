"""Reading manifests and JSONL, and writing a stage's outputs all at once or not at all."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd

from pipeline.errors import InputError

REQUIRED_COLUMNS = ("id", "image", "caption")
KNOWN_COLUMNS = REQUIRED_COLUMNS + ("label", "prompt", "patient_id", "site", "camera", "source")
DELIMITERS = (",", ";", "\t")
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
    names = header_names(path, [str(c) for c in df.columns])
    _require_columns(path, names, required)
    return [{n: _cell(v) for n, v in zip(names, row.values())} for row in df.to_dict(orient="records")]


def header_names(path: Path, names: list[str]) -> list[str]:
    """Header names as people export them, made usable: stray spaces removed, and the known columns
    (`id`, `Image`, ` Caption `) matched whatever their case. Two columns that end up with one name
    are an error naming both."""
    out = []
    for raw in names:
        name = raw.strip()
        out.append(name.lower() if name.lower() in KNOWN_COLUMNS else name)
    clashes = sorted({n for n in out if out.count(n) > 1})
    if clashes:
        raise InputError(f"{path}: the header names {[r for r, n in zip(names, out) if n in clashes]} "
                         f"all mean {clashes}: keep one")
    return out


def _require_columns(path: Path, columns: list[str], required: tuple[str, ...] = REQUIRED_COLUMNS) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(f"{path}: missing required column(s) {missing}; found {columns}")


def _read_csv(path: Path, required: tuple[str, ...] = REQUIRED_COLUMNS) -> list[dict[str, str]]:
    """CSV rows as text, as spreadsheets and hospital systems export them: a UTF-8 byte-order mark,
    CRLF line ends, `,` `;` or tab as the delimiter (the one whose header holds the required columns),
    quoted cells with line breaks. Bytes that are not UTF-8 survive as surrogates (curate flags them); a
    row with more cells than the header keeps them under EXTRA (curate flags it); an unclosed quote is an
    error naming the line, never a half-read file."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        first = fh.readline()
        delimiter = _delimiter(path, first, required)
        fh.seek(0)  # utf-8-sig skips a byte-order mark again
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            names = header_names(path, next(reader, []))
            rows = []
            for cells in reader:
                if not cells:
                    continue  # an empty line, as DictReader skips it
                row = dict(zip(names, cells + [""] * (len(names) - len(cells))))
                if len(cells) > len(names):
                    row[EXTRA] = "|".join(cells[len(names):])
                rows.append(row)
        except csv.Error as e:
            raise InputError(f"{path}: line {reader.line_num}: {e} (an unclosed quote?); nothing was read") from None
    return rows


def _delimiter(path: Path, header: str, required: tuple[str, ...]) -> str:
    """`,`, `;` or tab: the first whose header cells hold every required column."""
    header = header.lstrip("\ufeff")
    for d in DELIMITERS:
        names = [n.strip().lower() for n in next(csv.reader([header], delimiter=d), [])]
        if all(c in names for c in required):
            return d
    found = max(([n.strip() for n in next(csv.reader([header], delimiter=d), [])] for d in DELIMITERS), key=len)
    raise InputError(f"{path}: missing required column(s) {[c for c in required if c not in [f.lower() for f in found]]}; "
                     f"found {found} (delimiters tried: comma, semicolon, tab)")


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


def dir_sha256(folder: Path) -> str:
    """One hash of a folder's files (names and bytes), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
