"""Fetch the Compose specification's JSON schema from PyPI (no Docker engine or compose plugin here).

It ships inside the `docker-compose` 1.29.2 wheel (compose/config/compose_spec.json). Only the wheel is
downloaded (`pip download --no-deps`); nothing is installed. Usage: python scripts/compose_schema.py OUT
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "docker-compose==1.29.2"
MEMBER = "compose/config/compose_spec.json"


def main(out: str) -> None:
    dst = Path(out)
    if dst.is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL],
                       check=True)
        wheel = next(Path(tmp).glob("docker_compose-*.whl"))
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_suffix(".part")
        part.write_bytes(zipfile.ZipFile(wheel).read(MEMBER))
        part.replace(dst)


if __name__ == "__main__":
    main(sys.argv[1])
