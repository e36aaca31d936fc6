"""Shared fixtures: the committed params, and small synthetic datasets made once per session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import dataclasses

import pytest
import torch

from pipeline import config, synth

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def params() -> config.Params:
    return config.load(ROOT / "params.yaml")


def make_dataset(out: Path, params: config.Params, **synth_kw) -> Path:
    """Write a synthetic dataset with `synth` settings overridden by `synth_kw`."""
    faults = synth_kw.pop("faults", {})
    cfg = dataclasses.replace(params.synth, **synth_kw, faults=dataclasses.replace(params.synth.faults, **faults))
    synth.run(cfg, params.data, out)
    return out


ALL_FAULTS = dict(vague=0.06, mismatch=0.06, exact_duplicate=0.05, near_duplicate=0.05,
                  corrupt=0.04, not_image=0.03, empty_file=0.03)


@pytest.fixture(scope="session")
def faulty_set(tmp_path_factory, params) -> Path:
    """80 clean lesions at the default 96 px plus every kind of injected fault (at 64 px a near duplicate's
    one-pixel crop moves the 256-bit pHash by up to 32 bits, past `near_duplicate_bits`; at 96 px by <= 20)."""
    return make_dataset(tmp_path_factory.mktemp("faulty"), params, n=80, image_size=96, seed=3, faults=ALL_FAULTS)


@pytest.fixture(scope="session")
def clean_set(tmp_path_factory, params) -> Path:
    """40 clean lesions at 64 px."""
    return make_dataset(tmp_path_factory.mktemp("clean"), params, n=40, image_size=64, seed=5,
                        faults={k: 0.0 for k in ALL_FAULTS})


def tiny(params: config.Params, root: Path, **train_kw) -> config.Params:
    """Params for a fast run under `root`: 30-step base, 8-step fine-tune, batch 4."""
    paths = dataclasses.replace(params.paths, raw=str(root / "raw"), curated=str(root / "curated"),
                                split=str(root / "split"), models=str(root / "models"), reports=str(root / "reports"))
    base = dataclasses.replace(params.base, images=64, steps=30, batch_size=8, corpus_captions=300,
                               captions=str(root / "split" / "train.jsonl"))
    kw = dict(epochs=1, max_steps=8, batch_size=4, checkpoint_every=4, warmup_steps=2)
    train = dataclasses.replace(params.train, **{**kw, **train_kw})
    model = dataclasses.replace(params.model, image_size=64)  # tests: 64 px (the benchmark's default is 96)
    return dataclasses.replace(params, paths=paths, base=base, train=train, model=model)


def with_base(params: config.Params, root: Path, base_dir: Path, **train_kw) -> config.Params:
    """`tiny` params under `root` with the session's built-in base linked in as `models/base`."""
    p = tiny(params, root, **train_kw)
    (root / "models").mkdir(exist_ok=True)
    os.symlink(base_dir, root / "models" / "base")
    return p


@pytest.fixture(scope="session")
def records(tmp_path_factory, params, clean_set):
    """Curated chat samples of the 40-lesion clean set (mismatch model off, for speed)."""
    from pipeline import curate, data as dataio

    cfg = dataclasses.replace(params.curate, mismatch=dataclasses.replace(params.curate.mismatch, enabled=False))
    rows = dataio.read_manifest(clean_set / "manifest.csv")
    return curate.run(rows, clean_set, cfg, params.data, image_prefix=str(clean_set)).accepted


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, params) -> Path:
    """The built-in tiny Gemma 3, built and pre-trained for 30 steps, saved once per session."""
    from pipeline import base

    root = tmp_path_factory.mktemp("base")
    base.main(tiny(params, root))
    return root / "models" / "base"


def small_eval(p: config.Params, **gates) -> config.Params:
    """Evaluation settings for a fast test: short answers, one swap, a small bootstrap, loose gates."""
    e = p.evaluate
    g = dataclasses.replace(e.gates, **{**dict(min_f1_macro=0.0, max_ignore_rate=1.0, max_bias_gap=1.0,
                                               min_mismatch_auroc=0.0), **gates})
    e = dataclasses.replace(e, max_new_tokens=6, permutations=1, batch_size=16,
                            bias=dataclasses.replace(e.bias, bootstrap=20, min_group_size=1), gates=g)
    return dataclasses.replace(p, evaluate=e, promote=dataclasses.replace(p.promote, min_samples=1))  # 8-sample sets


def trained_project(params: config.Params, root: Path, base_dir: Path, records: list[dict], seed: int = 0,
                    **train_kw) -> config.Params:
    """A project under `root` with a split made of `records`, the shared base, and a trained adapter."""
    from pipeline import data as dataio, split, train

    p = small_eval(tiny(params, root, seed=seed, **{"max_steps": 4, **train_kw}))
    sp = Path(p.paths.split)
    sp.mkdir(parents=True, exist_ok=True)
    tr, va, te = records[:24], records[24:32], records[32:]
    for name, rows in (("train", tr), ("val", va), ("test", te)):
        dataio.write_jsonl(sp / f"{name}.jsonl", rows)
    dataio.write_jsonl(sp / "val_mismatch.jsonl", split.make_val_mismatch(va, tr, 0.5, 0))
    models = Path(p.paths.models)
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "base").exists():
        os.symlink(base_dir, models / "base")
    train.run(p, tr, va)
    return p


BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc, timeout: float = 30) -> None:
    """Terminate a server started by a test; kill it if it does not stop."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def promoted_project(params: config.Params, tmp_path: Path, base_dir: Path, records: list[dict], monkeypatch):
    """A trained, evaluated and promoted project in `tmp_path` on its own SQLite registry: (params, uri, version)."""
    from pipeline import evaluate, promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    p = trained_project(params, tmp_path, base_dir, records)
    evaluate.main(p)
    return p, uri, promote.main(p)["version"]


def run_ok(cmd, cwd, env, timeout=900) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def make_clone(tmp_path: Path) -> tuple[Path, dict]:
    """A clean git clone of the working tree (tracked and untracked-not-ignored files as they are now)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    dst = tmp_path / "repo"
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run_ok(["git", "init", "-q"], dst, env)
    run_ok(["git", "add", "-A"], dst, env)
    run_ok(["git", "commit", "-qm", "init"], dst, env)
    return dst, env


def tiny_project_params(params: dict) -> dict:
    """params.yaml (as a dict) shrunk so that the whole pipeline runs in a minute or two."""
    params["synth"].update(n=60, image_size=64)
    return tiny_sizes(params)


def tiny_sizes(params: dict) -> dict:
    """Any params file (as a dict) with the model, detector, base, training and evaluation shrunk; no
    domain key touched."""
    params["model"]["image_size"] = 64
    grid = 64 // params["model"].get("vision", {}).get("patch_size", 8)  # tokens_per_image kept unless it no longer fits
    params["model"]["tokens_per_image"] = min(params["model"].get("tokens_per_image", 16), grid * grid)
    params["curate"]["mismatch"].update(epochs=2, folds=3, image_size=32)
    params["split"]["min_stratum"] = 4
    params["base"].update(steps=10, images=32, corpus_captions=200)
    params["train"].update(max_steps=3, batch_size=4, checkpoint_every=2)
    params["evaluate"].update(max_new_tokens=4, permutations=1)
    params["evaluate"]["bias"].update(bootstrap=20)
    return params


def loop_project_params(params: dict) -> dict:
    """tiny_project_params for the nightly loop on ~40-image batches: gates that any model passes (what is
    tested is the wiring and the decision, not the model), any passing challenger counts as better (no
    improvement needed, any drop tolerated; promote's rules themselves are tested in test_promote)."""
    p = tiny_project_params(params)
    p["evaluate"]["gates"].update(min_f1_macro=0.0, max_ignore_rate=1.0, max_bias_gap=1.0, min_mismatch_auroc=0.0,
                                  max_recall_gap=None)
    p["evaluate"]["bias"]["min_group_size"] = 1
    # ~30 reference rows: no strata (a label x skin-type cell holds a row or two), and drift alone decides
    # (the F1 of a 4-step model is noise; the F1 rule is tested in test_monitor)
    p["monitor"].update(min_rows=10, min_captions=5, condition_on=[], max_f1_drop=None, harm_rows=0)
    p["promote"]["min_improvement"] = -1.0
    p["promote"]["max_drop"] = 1.0  # ... and no forgetting check: 4-step models differ by noise alone
    p["promote"]["min_samples"] = 1  # the tiny sets hold a handful of unseen samples
    return p


def kill_after_checkpoint(proc, ckpt: Path, step: int, kill, timeout: float = 300) -> None:
    """Wait until `ckpt` holds at least `step` optimizer steps, then `kill()` the still-running `proc`."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    kill()
    proc.wait()
