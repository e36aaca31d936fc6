"""`curate`: accept or quarantine every manifest row, with a reason for every rejection (docs/design.md §3.2).

The checks (and their order) are in `pipeline/checks.py`; this stage reads the raw dataset and the
ingested batches, runs them, and writes `paths.curated` atomically.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import checks, data as dataio
from pipeline.checks import ROOT_KEY, Result
from pipeline.config import Curate, Data, Params


def run(raw_rows: list[dict[str, str]], root: Path, cfg: Curate, data: Data, image_prefix: str = "") -> Result:
    """Curate manifest rows of the dataset at `root` (the pure function of the stage)."""
    return checks.curate_rows(raw_rows, root, cfg, data, image_prefix)


def read_rows(root: Path, batches: Path | None = None) -> list[dict[str, str]]:
    """The raw dataset's manifest rows, then those of every batch folder under `batches` (added by
    `ingest`, each with its own manifest and images; its rows carry their folder in ROOT_KEY)."""
    rows = dataio.read_manifest(dataio.find_manifest(root))
    if batches is not None and batches.is_dir():
        for folder in sorted(p for p in batches.iterdir() if p.is_dir()):
            rows += [{**r, ROOT_KEY: str(folder)} for r in dataio.read_manifest(dataio.find_manifest(folder))]
    return rows


def main(params: Params) -> dict:
    """Read `paths.raw`, write `paths.curated` atomically."""
    root = Path(params.paths.raw)
    rows = read_rows(root, Path(params.paths.batches))
    checks.check_data_params(rows, params.data, f"the manifest of {root}")
    result = run(rows, root, params.curate, params.data, image_prefix=params.paths.raw)
    with dataio.atomic_dir(Path(params.paths.curated)) as out:
        dataio.write_jsonl(out / "samples.jsonl", result.accepted)
        dataio.write_jsonl(out / "quarantine.jsonl", result.quarantined)
        dataio.write_json(out / "report.json", result.report)
    return result.report
