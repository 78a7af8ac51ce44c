"""Command line: ``raydd <command>``. Heavy imports happen inside the commands."""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

from .errors import RayddError

DATA_SOURCES = ("digits", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "imagefolder")
DESCRIPTION = """raydd distils a labelled image dataset into a few synthetic images per class with APM
(adversarial prediction matching) on Ray, and evaluates them by training other architectures on them."""
EXAMPLES = """example, on the embedded 8x8 digits (minutes on 2 CPU cores):
  raydd run configs/digits.yaml            # teachers -> distillation -> evaluation, all in runs/digits/
  raydd config show configs/digits.yaml --set distill.ipc=10     # the resolved config, every key
  raydd export runs/digits/synset --format imagefolder --out digits-png   # PNGs by class + labels.csv
and in Python:
  syn = raydd.load_synset("runs/digits/synset"); loader = syn.dataloader(64, soft_labels=True)"""


def _config_args(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/digits.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set distill.ipc=10 (repeatable)")
    if out:
        p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydd", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
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
    models_list = models_sub.add_parser("list", help="list the registered architectures")
    models_list.add_argument("--options", action="store_true", help="also each architecture's options")

    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    _config_args(config_sub.add_parser("show", help="print the resolved config (every key, defaults too) as YAML"),
                 out=False)

    export = sub.add_parser("export", help="write a synset as PNG folders by class or as one .npz")
    export.add_argument("synset", type=Path, help="synset directory, e.g. runs/digits/synset")
    export.add_argument("--format", dest="fmt", choices=("imagefolder", "npz"), default="imagefolder",
                        help="imagefolder: OUT/<class>/<index>.png + OUT/labels.csv; npz: one OUT file")
    export.add_argument("--out", type=Path, required=True, help="output directory (imagefolder) or file (npz)")
    export.add_argument("--dtype", choices=("uint8", "float32"), default="uint8",
                        help="npz pixels: uint8 (as the PNGs) or float32 (exact, unclamped)")

    teachers = sub.add_parser("teachers", help="teacher pools")
    teachers_sub = teachers.add_subparsers(dest="teachers_command", required=True)
    _config_args(teachers_sub.add_parser("train", help="train the teacher pool on real shards"))

    _config_args(sub.add_parser("distill", help="distil a synthetic set with APM on Ray"))
    ev = sub.add_parser("evaluate", help="evaluate a synset over the architecture matrix (Ray Tune)")
    _config_args(ev)
    ev.add_argument("--synset", type=Path, default=None, help="synset directory (default: RUN/synset)")
    _config_args(sub.add_parser("run", help="prepare → teachers → distill → evaluate, skipping done stages"))
    rank = sub.add_parser("rank", help="rank architectures on the synset vs the full data (Spearman/Kendall)")
    _config_args(rank)
    rank.add_argument("--candidates", nargs="+", required=True, metavar="SPEC",
                      help="at least 3 model specs, e.g. convnet:width=16 convnet:depth=2 resnet18")
    rank.add_argument("--synset", type=Path, default=None, help="synset directory (default: RUN/synset)")
    rank.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples over candidates")
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
    except BrokenPipeError:   # `raydd … | head` closed our stdout: stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # the interpreter's own flush at exit must not fail again
        return 141


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
        from .models import available, options
        for name, desc in available():
            print(f"{name:<22} {desc}")
            if args.options:
                for key, text in (options(name) if not name.startswith("timm:") else [TIMM_RESIZE]):
                    print(f"{'':<4}{key:<18} {text}")
        return 0
    if args.command == "config":
        from .config import load_config
        print(load_config(args.config, args.overrides).to_yaml(), end="")
        return 0
    if args.command == "export":
        from .export import export_synset
        out = export_synset(args.synset, args.fmt, args.out, dtype=args.dtype)
        print(f"{out}: {args.fmt} export of {args.synset}")
        return 0

    if args.command == "rank":
        return _rank(args)

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


def _rank(args: argparse.Namespace) -> int:
    """``raydd rank``: candidates and the synset are checked before the run directory is touched."""
    from . import pipeline
    from .config import load_config
    from .evaluate.rank import check_candidates, check_synset, run_rank
    cfg = load_config(args.config, args.overrides)
    candidates = check_candidates(args.candidates)
    run_dir = pipeline.run_dir_for(cfg, args.out)
    pipeline.check_dir(run_dir, "--out" if args.out is not None else "the run directory")
    check_synset(args.synset if args.synset is not None else run_dir / "synset")
    with _undo_if_failed(run_dir):
        result = run_rank(cfg, run_dir, candidates, synset_dir=args.synset, resamples=args.resamples)
    print(result.table, flush=True)
    print(f"[rank] {result.md} · {result.json} · {result.plot}", flush=True)
    return 0


TIMM_RESIZE = ("resize", "auto (up-sample to a size the model accepts), none, or N pixels; "
               "other options go to timm.create_model")


def _version() -> str:
    """raydd's version beside torch's and Ray's, read from package metadata (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__
    deps = []
    for dist in ("torch", "ray"):
        try:
            deps.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            deps.append(f"{dist} not installed")
    return f"raydd {__version__} ({', '.join(deps)})"


# Files that hold finished work: a directory holding one is never removed.
WORK = ("*.safetensors", "*.tar", "*.jsonl", "results.json", "dataset.json")


@contextlib.contextmanager
def _undo_if_failed(out: Path) -> Iterator[None]:
    """When a command refuses or fails before finishing any work, remove what it created in a
    fresh output directory (``config.yaml``, empty folders, Tune's state), so a corrected rerun
    starts clean and a refusal leaves nothing half-written."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        with _keep_claim_if_failed(out):  # an existing run: resuming keeps everything
            yield
        return
    made = next((p for p in reversed((out, *out.parents)) if not p.exists()), None)
    try:
        yield
    except BaseException:
        if out.is_dir() and not _work(out):
            from .rundir import release
            release(out)  # unlocked before the lock file goes
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
            else:  # the directory existed empty: empty it again
                for child in out.iterdir():
                    if child.is_dir():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
        raise


def _work(out: Path) -> dict[Path, int]:
    return {f: f.stat().st_mtime_ns for pattern in WORK for f in out.rglob(pattern) if f.is_file()}


@contextlib.contextmanager
def _keep_claim_if_failed(out: Path) -> Iterator[None]:
    """A refusal after the stage's claim rewrote ``RUN/config.yaml`` puts the earlier one back (or
    removes a new one), as long as no finished work was written since: it still describes the run."""
    saved = out / "config.yaml"
    before, work = (saved.read_bytes() if saved.is_file() else None), _work(out)
    try:
        yield
    except BaseException:
        if _work(out) == work:
            from .io import write_bytes
            if before is None:
                saved.unlink(missing_ok=True)
            elif not saved.is_file() or saved.read_bytes() != before:
                write_bytes(saved, before)
        raise


if __name__ == "__main__":
    sys.exit(main())
