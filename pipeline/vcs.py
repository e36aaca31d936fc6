"""git and DVC helpers shared by the stages: the current commit, `dvc add`, the hashes in dvc.lock."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.errors import InputError


def tool(name: str) -> str:
    """A command of the environment this Python runs in (dvc beside it), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def git_commit() -> str | None:
    """HEAD of the git work tree the command runs in, or None outside one (or without git)."""
    try:
        r = run(["git", "rev-parse", "HEAD"])
    except OSError:
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def track(paths: list[Path]) -> None:
    """`dvc add` folders written outside any stage (ingested batches), in a DVC project only."""
    if not Path(".dvc").is_dir() or not paths:
        return
    r = run([tool("dvc"), "--wait-for-lock", "add", "--quiet", *map(str, paths)])
    if r.returncode != 0:
        raise InputError(f"dvc add {' '.join(map(str, paths))} failed: {r.stderr.strip()[-1500:]}")


def dvc_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """`dvc.<path>` -> md5 of every stage output recorded in dvc.lock."""
    import yaml

    if not lock.is_file():
        return {}
    out = {}
    for stage in (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).values():
        for o in stage.get("outs", []):
            if "md5" in o:
                out[f"dvc.{o['path']}"] = o["md5"]
    return out
