"""Command line: `python -m pipeline <command>` (DESIGN §10).

Exit status: 0 success, 1 a gate or check failed, 2 unusable input or configuration, 3 a service (the
MLflow tracking server) could not be reached: worth a retry.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline import config
from pipeline.errors import CheckFailed, InputError, ServiceUnavailable

SYNTH_FLAGS = {  # flag -> params key under synth
    "n": "n", "seed": "seed", "image_size": "image_size", "site": "site", "camera": "camera",
    "spurious_darkness": "spurious_darkness", "vague": "faults.vague", "mismatch": "faults.mismatch",
    "mismatch_mode": "faults.mismatch_mode", "exact_duplicate": "faults.exact_duplicate",
    "near_duplicate": "faults.near_duplicate", "corrupt": "faults.corrupt",
    "not_image": "faults.not_image", "empty_file": "faults.empty_file",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set split.seed=3 (value read as YAML)")
    s = sub.add_parser("synth", parents=[common], help="generate the synthetic lesion benchmark")
    s.add_argument("--out", help="dataset folder to write (default: paths.raw)")
    for flag in SYNTH_FLAGS:
        s.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None)
    sub.add_parser("curate", parents=[common], help="accept or quarantine every row")
    sub.add_parser("split", parents=[common], help="patient-grouped, stratified train/val/test split")
    sub.add_parser("base", parents=[common], help="build and pre-train the built-in tiny Gemma 3")
    sub.add_parser("train", parents=[common], help="PEFT fine-tune with the three-part alignment loss")
    sub.add_parser("evaluate", parents=[common], help="F1, image reliance, mismatch robustness, bias, gates")
    pr = sub.add_parser("promote", parents=[common], help="register the adapter; move 'champion' if it earns it")
    pr.add_argument("--rollback", action="store_true", help="give 'champion' back to the 'previous' version")
    mo = sub.add_parser("monitor", parents=[common], help="drift check of an incoming batch (exit 1: retrain)")
    mo.add_argument("--batch", required=True, help="batch folder, e.g. data/incoming/2026-11-27")
    ig = sub.add_parser("ingest", parents=[common], help="add a labelled batch to the training data")
    ig.add_argument("--batch", required=True, help="batch folder, e.g. data/incoming/2026-11-27")
    pu = sub.add_parser("publish", parents=[common], help="commit the DVC metadata and push to the DVC remote")
    pu.add_argument("--message", default=None, help="git commit message")
    return p


def _synth(args, params: config.Params) -> dict:
    from pipeline import data as dataio, synth

    overrides = list(args.overrides)
    overrides += [f"synth.{key}={getattr(args, flag)}" for flag, key in SYNTH_FLAGS.items() if getattr(args, flag) is not None]
    if Path(args.params).exists():
        params = config.load(args.params, overrides)
    else:  # synth also runs outside a project, on the defaults
        params = config.build(config.Params, config.apply_overrides({}, overrides))
    out = Path(args.out or params.paths.raw)
    with dataio.atomic_dir(out) as tmp:
        return synth.run(params.synth, params.data, tmp)


def _report_to_launcher(code: int, error: str) -> None:
    """In a rank started by `train`'s torchrun launch: leave the error for the launching process."""
    if "RANK" in os.environ:
        from pipeline import distributed

        distributed.report_failure(code, error)


def _prints_summary() -> bool:
    """One summary per command: under torchrun rank 0 prints it, or the launching process when `train`
    started the ranks itself."""
    if "RANK" not in os.environ:
        return True
    from pipeline import distributed

    return os.environ["RANK"] == "0" and not distributed.is_rank_process()


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "synth":
            summary = _synth(args, None)
        else:
            params = config.load(args.params, args.overrides)
            module = __import__(f"pipeline.{args.command}", fromlist=["main"])
            if args.command == "promote":
                summary = module.main(params, args.rollback)
            elif args.command == "monitor":
                summary = module.main(params, args.batch)
            elif args.command == "ingest":
                summary = module.main(params, args.batch, args.params)
            elif args.command == "publish":
                summary = module.main(params, args.message)
            elif args.command == "train":  # the argv again, for the ranks when it starts torchrun
                summary = module.main(params, ["--params", args.params, *[f"--set={o}" for o in args.overrides]])
            else:
                summary = module.main(params)
    except (InputError, ServiceUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        _report_to_launcher(e.exit_code, str(e))
        return e.exit_code
    except CheckFailed as e:
        if type(e).__name__ == "DriftFound":
            print(str(e))  # the summary, on stdout like any other
            print("drift: thresholds crossed, retraining called for", file=sys.stderr)
        else:
            print(f"check failed: {e}", file=sys.stderr)
        _report_to_launcher(e.exit_code, str(e))
        return e.exit_code
    except Exception as e:  # a rank's crash: its launcher reports it
        _report_to_launcher(1, f"{type(e).__name__}: {e}")
        raise
    if _prints_summary():
        print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(run())
