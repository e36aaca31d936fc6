"""Command line: `python -m pipeline <command>` (docs/design.md §10).

Exit status: 0 success, 1 a gate or check failed, 2 unusable input or configuration, 3 a service (the
MLflow tracking server) could not be reached: worth a retry.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline import config
from pipeline.errors import CheckFailed, DriftFound, InputError, ServiceUnavailable

SYNTH_FLAGS = {  # flag -> params key under synth
    "n": "n", "seed": "seed", "image_size": "image_size", "site": "site", "camera": "camera",
    "spurious_darkness": "spurious_darkness", "vague": "faults.vague", "mismatch": "faults.mismatch",
    "mismatch_mode": "faults.mismatch_mode", "exact_duplicate": "faults.exact_duplicate",
    "near_duplicate": "faults.near_duplicate", "corrupt": "faults.corrupt",
    "not_image": "faults.not_image", "empty_file": "faults.empty_file",
}


@dataclass(frozen=True)
class Command:
    """One command: its help, its own options, and how it calls its stage's `main`."""

    help: str
    options: tuple[tuple[tuple[str, ...], dict], ...] = ()
    call: Callable[[config.Params, argparse.Namespace], dict] | None = None  # None: `main(params)`


BATCH = (("--batch",), {"required": True, "help": "batch folder, e.g. data/incoming/2026-11-27"})
COMMANDS: dict[str, Command] = {
    "synth": Command("generate the synthetic lesion benchmark",
                     ((("--out",), {"help": "dataset folder to write (default: paths.raw)"}),
                      *(((f"--{f.replace('_', '-')}",), {"dest": f, "default": None}) for f in SYNTH_FLAGS))),
    "curate": Command("accept or quarantine every row"),
    "split": Command("patient-grouped, stratified train/val/test split"),
    "base": Command("build and pre-train the built-in tiny Gemma 3; --shape: write a stand-in of a real size",
                    ((("--shape",), {"default": None, "help": "gemma-3-4b (or gemma-3-tiny): a randomly initialised "
                                     "model of that published config, saved as a hub-format folder"}),
                     (("--out",), {"default": None, "help": "with --shape: the folder to write (default: "
                                   "paths.models/standin-SHAPE)"})),
                    lambda p, a: _stage("base").main(p, a.shape, a.out)),
    "train": Command("PEFT fine-tune with the three-part alignment loss (torchrun when train.distributed asks)",
                     call=lambda p, a: _stage("train").main(p, ["--params", a.params, *[f"--set={o}" for o in a.overrides]])),
    "evaluate": Command("F1, image reliance, mismatch robustness, bias, gates"),
    "promote": Command("register the adapter; move 'champion' if it earns it",
                       ((("--rollback",), {"action": "store_true", "help": "give 'champion' back to 'previous'"}),
                        (("--approve",), {"default": None, "metavar": "VERSION",
                                          "help": "a person approves the version awaiting approval"}),
                        (("--reject",), {"default": None, "metavar": "VERSION",
                                         "help": "a person rejects the version awaiting approval"}),
                        (("--by",), {"default": None, "help": "who approved or rejected (recorded as a tag)"})),
                       lambda p, a: _stage("promote").main(p, a.rollback, a.approve, a.reject, a.by)),
    "monitor": Command("drift check of an incoming batch (exit 1: retrain); --pending: the batches not yet checked",
                       ((("--batch",), {"help": BATCH[1]["help"]}),
                        (("--pending",), {"action": "store_true", "help": "list the unchecked batches (JSON)"})),
                       lambda p, a: _monitor(p, a)),
    "ingest": Command("add a labelled batch to the training data", (BATCH,),
                      lambda p, a: _stage("ingest").main(p, a.batch, a.params)),
    "lineage": Command("the chain from data to a registry version: commit, DVC hashes, base, runs, decision",
                       ((("--alias",), {"default": None, "help": "registry alias (default: champion)"}),
                        (("--version",), {"default": None, "help": "registry version number"})),
                       lambda p, a: _stage("promote").lineage(p, a.version, a.alias)),
    "export": Command("merge an adapter into its base: a standalone model for serving",
                      ((("--alias",), {"default": None, "help": "registry alias (default: champion)"}),
                       (("--version",), {"default": None, "help": "registry version number"}),
                       (("--adapter",), {"default": None, "help": "a local adapter folder instead of the registry"}),
                       (("--out",), {"default": None, "help": "output folder (default: paths.models/export/...)"})),
                      lambda p, a: _stage("export").main(p, a.version, a.alias, a.adapter, a.out)),
    "publish": Command("commit the DVC metadata and push to the DVC remote",
                       ((("--message",), {"default": None, "help": "git commit message"}),),
                       lambda p, a: _stage("publish").main(p, a.message)),
}


def _stage(name: str):
    return importlib.import_module(f"pipeline.{name}")


def _monitor(params: config.Params, args: argparse.Namespace) -> dict:
    monitor = _stage("monitor")
    if args.pending:
        return {"pending": monitor.pending(params)}
    if not args.batch:
        raise InputError("monitor: --batch DIR (or --pending) is required")
    return monitor.main(params, args.batch)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key, e.g. --set split.seed=3 (value read as YAML)")
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, parents=[common], help=cmd.help)
        for flags, kw in cmd.options:
            sp.add_argument(*flags, **kw)
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
            call = COMMANDS[args.command].call or (lambda p, a: _stage(a.command).main(p))
            summary = call(params, args)
    except (InputError, ServiceUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        _report_to_launcher(e.exit_code, str(e))
        return e.exit_code
    except CheckFailed as e:
        if isinstance(e, DriftFound):
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
