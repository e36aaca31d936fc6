"""`publish`: record what a run produced and push it to the DVC remote (the `finetune` DAG's last step).

`python -m pipeline publish [--message TEXT]`:
- in a git repository, commits the DVC metadata that pins this version (dvc.lock, params.yaml and the
  `.dvc` files of ingested batches), so that a fresh clone knows which data and model to pull;
- `dvc push -r <publish.remote>` sends the cached outputs (data, base model, adapter) to the remote, so
  that `git clone` + `dvc pull` anywhere reproduces the champion's adapter byte for byte.
The remote is chosen by name (`publish.remote`, or PIPELINE_DVC_REMOTE); its URL lives in `.dvc/config`
(a shared folder by default) or `.dvc/config.local`; `publish.remote: ""` skips the push.
A remote that cannot be written is a ServiceUnavailable (exit 3: the DAG retries); nothing is lost,
since the commit and the local cache stay and a retry pushes what is missing.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline import config, vcs
from pipeline.errors import InputError, ServiceUnavailable

TRACKED = ("dvc.lock", "params.yaml")


def dvc_files(params: config.Params) -> list[str]:
    """The .dvc files (and the .gitignore files DVC writes beside them) of ingested data."""
    out = []
    for folder in (Path(params.paths.batches), Path(params.paths.eval)):
        if folder.is_dir():
            out += [str(p) for p in sorted(folder.glob("*.dvc"))]
            if (folder / ".gitignore").is_file():
                out.append(str(folder / ".gitignore"))
    return out


def commit(params: config.Params, message: str) -> str | None:
    """Commit the DVC metadata if this is a git work tree and something changed; returns the commit."""
    if vcs.run(["git", "rev-parse", "--is-inside-work-tree"]).returncode != 0:
        return None
    files = [f for f in (*TRACKED, *dvc_files(params)) if Path(f).exists()]
    r = vcs.run(["git", "add", "-f", "--", *files])
    if r.returncode != 0:
        raise InputError(f"git add failed: {r.stderr.strip()}")
    if vcs.run(["git", "diff", "--cached", "--quiet"]).returncode != 0:
        r = vcs.run(["git", "commit", "-q", "-m", message])
        if r.returncode != 0:
            raise InputError(f"git commit failed: {r.stderr.strip()}")
    return vcs.git_commit()


def push(remote: str) -> dict:
    r = vcs.run([vcs.tool("dvc"), "--wait-for-lock", "push", "-r", remote])
    if r.returncode != 0:
        err = r.stderr.strip()[-1500:]
        if "does not exist" in err and "remote" in err:
            raise InputError(f"publish: DVC remote {remote!r} is not configured (dvc remote add {remote} URL): {err}")
        raise ServiceUnavailable(f"publish: could not push to the DVC remote {remote!r}: {err}")
    return {"remote": remote, "output": r.stdout.strip()[-500:]}


def main(params: config.Params, message: str | None = None) -> dict:
    if not Path("dvc.yaml").is_file():
        raise InputError("publish: run it in the project folder (dvc.yaml not found)")
    remote = os.environ.get("PIPELINE_DVC_REMOTE", params.publish.remote)
    sha = commit(params, message or params.publish.message)
    pushed = push(remote) if remote else {"remote": None, "output": "push skipped (publish.remote is empty)"}
    return {"commit": sha, **pushed}
