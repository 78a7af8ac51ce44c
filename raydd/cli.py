"""Command line: ``raydd <command>``. Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path
from typing import Iterator

from .errors import RayddError

DATA_SOURCES = ("digits", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "imagefolder")


def _config_args(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/digits.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.ipc=10 (repeatable)")
    if out:
        p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare datasets as WebDataset shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="convert a dataset into shards + dataset.json")
    prep.add_argument("source", choices=DATA_SOURCES)
    prep.add_argument("--out", type=Path, required=True, help="output directory for the shards")
    prep.add_argument("--src", default=None, help="raw input (file, archive or folder)")
    prep.add_argument("--image-size", type=int, default=None, help="resize to N×N (imagefolder)")
    prep.add_argument("--shard-size", type=int, default=10000, help="samples per shard")

    models = sub.add_parser("models", help="the model zoo")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list the registered architectures")

    teachers = sub.add_parser("teachers", help="teacher pools")
    teachers_sub = teachers.add_subparsers(dest="teachers_command", required=True)
    _config_args(teachers_sub.add_parser("train", help="train the teacher pool on real shards"))

    _config_args(sub.add_parser("distill", help="distil a synthetic set with APM on Ray"))
    ev = sub.add_parser("evaluate", help="evaluate a synset over the architecture matrix (Ray Tune)")
    _config_args(ev)
    ev.add_argument("--synset", type=Path, default=None, help="synset directory (default: RUN/synset)")
    _config_args(sub.add_parser("run", help="prepare → teachers → distill → evaluate, skipping done stages"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except RayddError as e:
        print(f"raydd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raydd: interrupted; finished work is kept — rerun the same command to resume",
              file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "data":
        from .data import prepare
        from .pipeline import check_dir
        if args.shard_size < 1:
            raise RayddError(f"--shard-size {args.shard_size} is invalid; expected an integer >= 1")
        check_dir(args.out, "--out")
        with _undo_if_failed(args.out):
            info = prepare(args.source, args.out, src=args.src, image_size=args.image_size,
                           shard_size=args.shard_size)
        counts = info["counts"]
        print(f"{args.out}: {counts['train']['total']} train / {counts['test']['total']} test images, "
              f"{info['num_classes']} classes, shape {'×'.join(map(str, info['shape']))}")
        return 0
    if args.command == "models":
        from .models import available
        for name, desc in available():
            print(f"{name:<22} {desc}")
        return 0

    from . import pipeline
    from .config import load_config
    cfg = load_config(args.config, args.overrides)
    run_dir = pipeline.run_dir_for(cfg, args.out)
    pipeline.check_dir(run_dir, "--out" if args.out is not None else "the run directory")
    with _undo_if_failed(run_dir):
        if args.command == "teachers":
            pipeline.stage_teachers(cfg, run_dir)
        elif args.command == "distill":
            pipeline.stage_distill(cfg, run_dir)
        elif args.command == "evaluate":
            pipeline.stage_evaluate(cfg, run_dir, synset_dir=args.synset)
        elif args.command == "run":
            pipeline.run(cfg, run_dir)
    return 0


# Files that hold finished work: a directory holding one is never removed.
WORK = ("*.safetensors", "*.tar", "*.jsonl", "results.json", "dataset.json")


@contextlib.contextmanager
def _undo_if_failed(out: Path) -> Iterator[None]:
    """When a command refuses or fails before finishing any work, remove what it created in a
    fresh output directory (``config.yaml``, empty folders, Tune's state), so a corrected rerun
    starts clean and a refusal leaves nothing half-written."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        yield  # an existing run: resuming keeps everything
        return
    made = next((p for p in reversed((out, *out.parents)) if not p.exists()), None)
    try:
        yield
    except BaseException:
        if out.is_dir() and not any(f.is_file() for pattern in WORK for f in out.rglob(pattern)):
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            else:  # the directory existed empty: empty it again
                for child in out.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
