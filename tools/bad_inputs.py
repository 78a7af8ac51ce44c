"""Bad-input campaign: try many distinct bad inputs against the command line and classify each outcome.

    nice -n 19 python tools/bad_inputs.py [--timeout 60] [-k SUBSTRING] [--show]

Every case builds its input (a config, --set overrides, a path, a corrupt data file, a bad synset or
manifest …) in a temporary directory on the embedded 8×8 digits and runs `raydd …` on it in a forked
child (raydd and torch are imported once, so a case costs its own work only) with a timeout. Outcomes:

  clear      exit 2 and one line `raydd: error: …` holding the expected key/file (argparse's usage + one
             error line for malformed command lines counts too)
  traceback  a Python traceback on stderr
  silent     exit 0: the bad input was accepted
  hang       no exit within --timeout
  unclear    anything else (another exit code, several lines, the key/file not named)

The cases of tests/test_bad_inputs.py come first (the suite runs those in-process); the rest are below.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")   # the children are forked: no thread pools before the fork
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

torch.set_num_threads(1)

# What the commands import lazily, imported once here (imports start no threads): a forked case pays
# only its own work, not seconds of imports.
import ray  # noqa: E402,F401
import ray.tune  # noqa: E402,F401

import raydd.cli  # noqa: E402,F401
import raydd.distillation  # noqa: E402,F401
import raydd.evaluate  # noqa: E402,F401
import raydd.teachers  # noqa: E402,F401
from test_bad_inputs import CASES as SUITE_CASES  # noqa: E402
from test_bad_inputs import TINY, _config, _synset  # noqa: E402

DIGITS = "configs/digits.yaml"


def _run(t, d, o, *sets, cmd=("run",), cfg=DIGITS):
    """``raydd CMD CFG`` on the prepared digits, tiny, plus ``--set`` overrides."""
    argv = [*cmd, cfg, "--set", f"data.dir={d}", *TINY]
    for s in sets:
        argv += ["--set", s]
    return argv + ["--out", o]


def _set(kv, frag=None, cmd=("run",)):
    """A case whose only bad input is the override ``kv``; the error must name its key."""
    key = kv.split("=", 1)[0]
    return (f"--set {kv}", lambda t, d, o: _run(t, d, o, kv, cmd=cmd), [frag or key])


SET_CASES = [_set(kv, frag) for kv, frag in [
    ("distill.ipc=0", None), ("distill.ipc=-1", None), ("distill.ipc=abc", None), ("distill.ipc=2.5", None),
    ("distill.ipc=true", None), ("distill.ipc=null", None), ("distill.ipc=1e400", None),
    ("distill.groups=0", None), ("distill.groups=3", "distill.groups"), ("distill.rounds=0", None),
    ("distill.rounds=-5", None), ("distill.student_epochs=0", None), ("distill.checkpoints=0", None),
    ("distill.refresh_every=0", None), ("distill.lr_net=0", None), ("distill.lr_net=.nan", None),
    ("distill.lr_img=-1", None), ("distill.lr_img_decay=-0.5", None), ("distill.lr_img_decay_at=1.5", None),
    ("distill.batch_size=0", None), ("distill.segment=0", None), ("distill.alpha=-1", None),
    ("distill.distance=l3", None), ("distill.objective=exp", None), ("distill.init=zeros", None),
    ("distill.soft_labels=last", None), ("distill.checkpoint_every=0", None), ("distill.max_retries=-2", None),
    ("distill.method=nosuch", "nosuch"), ("distill.arch=resnet9000", "resnet9000"),
    ("distill.service.max_batch=0", None), ("distill.service.max_restarts=-2", None),
    ("distill.resources.cpus=-1", None), ("distill.resources.gpus=-0.5", None),
    ("distill.resources={cpus: abc}", "distill.resources.cpus"), ("distill.pool.p_main=1.5", None),
    ("distill.pool.activations=[nosuch]", "nosuch"), ("distill.pool.norms=[nosuch]", "nosuch"),
    ("teachers.count=0", None), ("teachers.epochs=0", None), ("teachers.lr=-0.1", None),
    ("teachers.batch_size=0", None), ("teachers.max_retries=-2", None), ("teachers.resources.cpus=abc", None),
    ("teachers.dsa=perhaps", None), ("evaluate.archs=[]", None), ("evaluate.modes=[nosuch]", "nosuch"),
    ("evaluate.seeds=0", None), ("evaluate.epochs=0", None), ("evaluate.lr=0", None),
    ("evaluate.batch_size=-3", None), ("evaluate.soft_loss=mse", None), ("evaluate.soft_temperature=0", None),
    ("evaluate.baselines=[nosuch]", "nosuch"), ("evaluate.kd.alpha=2", None), ("evaluate.kd.temperature=0", None),
    ("evaluate.elf.distance=l5", None), ("evaluate.arch_lr={nosuch: 0.1}", "nosuch"),
    ("evaluate.arch_lr={mlp: -1}", "evaluate.arch_lr"), ("evaluate.mode_archs.hard=[resnet9000]", "resnet9000"),
    ("evaluate.val_size=-1", None), ("evaluate.lr_search=[0]", None), ("evaluate.report_every=0", None),
    ("data.source=mnist", None), ("data.on_corrupt=ignore", None), ("data.shard_size=0", None),
    ("data.image_size=-8", None), ("data.dsa_strategy=nosuch", "nosuch"), ("data.verify=perhaps", None),
    ("seed=abc", None), ("seed=99999999999999999999999", "seed"), ("device=tpu", None), ("name=", "name"),
    ("name=a/b", "name"), ("ray.num_gpus=-1", None), ("ray.address=notahost:abc", "notahost:abc"),
    ("tracking.snapshot_every=-1", None), ("nosuch.key=1", "nosuch"), ("distill.nosuch=1", "nosuch"),
    ("distill=3", "distill"), ("distill.ipc.x=1", "distill.ipc"),
]]

SYNTAX_CASES = [
    ("--set without =", lambda t, d, o: _run(t, d, o, "distill.ipc"), ["distill.ipc"]),
    ("--set =3", lambda t, d, o: _run(t, d, o, "=3"), ["=3"]),
    ("--set a..b=3", lambda t, d, o: _run(t, d, o, "distill..ipc=3"), ["distill..ipc"]),
    ("--set unclosed [", lambda t, d, o: _run(t, d, o, "evaluate.archs=[mlp"), ["evaluate.archs"]),
    ("--set python tag", lambda t, d, o: _run(t, d, o, "name=!!python/object/apply:os.getpid []"), ["name"]),
]


def _mkdir(p):
    p.mkdir()
    return str(p)


def _cfg(text):
    return lambda t, d, o: ["run", _config(t, text), "--set", f"data.dir={d}", *TINY, "--out", o]


# the anchors live inside a known key (top-level anchors would be refused as unknown keys before
# anything expands): name holds 9**9 leaves by reference, and quoting it in the error must stay short
BILLION_LAUGHS = "name:\n  - &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  - &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

FILE_CASES = [
    ("config missing", lambda t, d, o: ["run", str(t / "nosuch.yaml"), "--out", o], ["nosuch.yaml"]),
    ("config is a directory", lambda t, d, o: ["run", _mkdir(t / "cfgdir"), "--out", o], ["cfgdir"]),
    ("config top-level list", _cfg("- a\n- b\n"), ["cfg.yaml"]),
    ("config yaml syntax error", _cfg("name: [a\n"), ["cfg.yaml"]),
    ("config tab indentation", _cfg("distill:\n\tipc: 3\n"), ["cfg.yaml"]),
    ("config unknown top-level key", _cfg("name: x\nnosuch: 1\n"), ["nosuch"]),
    ("config python tag", _cfg("name: !!python/object/apply:os.getpid []\n"), ["cfg.yaml"]),
    ("config billion laughs", _cfg(BILLION_LAUGHS), ["name"]),
    ("config non-string key", _cfg("1: x\n"), ["1"]),
    ("config name is a number", _cfg("name: 12\n"), ["name"]),
    ("config section is a list", _cfg("distill: [1, 2]\n"), ["distill"]),
    ("config section is null", _cfg("distill:\n"), ["distill"]),
    ("config not UTF-8 (latin-1)", _cfg("name: caf\xe9\n".encode("latin-1")), ["cfg.yaml"]),
    ("config huge", _cfg("name: " + "x" * 2_000_000 + "\n"), ["name"]),
]


def _prepare(*extra):
    return lambda t, d, o: ["data", "prepare", *extra, "--out", o]


PREPARE_CASES = [
    ("prepare --src missing", lambda t, d, o: ["data", "prepare", "cifar10", "--src", str(t / "nope"), "--out", o],
     ["nope"]),
    ("prepare cifar10 --src empty dir", lambda t, d, o: ["data", "prepare", "cifar10", "--src", str(t), "--out", o],
     ["cifar-10-python.tar.gz"]),
    ("prepare fashion-mnist --src a file", lambda t, d, o: ["data", "prepare", "fashion-mnist", "--src",
                                                            _config(t, "x", "file.gz"), "--out", o], ["file.gz"]),
    ("prepare --shard-size 0", _prepare("digits", "--shard-size", "0"), ["--shard-size"]),
    ("prepare --shard-size abc", _prepare("digits", "--shard-size", "abc"), ["--shard-size"]),
    ("prepare imagefolder without --image-size", lambda t, d, o: ["data", "prepare", "imagefolder", "--src", str(t),
                                                                  "--out", o], ["--image-size"]),
    ("prepare --image-size 0", lambda t, d, o: ["data", "prepare", "imagefolder", "--image-size", "0", "--src",
                                                str(t), "--out", o], ["--image-size"]),
    ("prepare --image-size -4", lambda t, d, o: ["data", "prepare", "imagefolder", "--image-size", "-4", "--src",
                                                 str(t), "--out", o], ["--image-size"]),
    ("prepare unknown source", _prepare("mnist"), ["source"]),
    ("prepare fashion-mnist wrong magic", lambda t, d, o: ["data", "prepare", "fashion-mnist", "--src",
                                                           str(_idx_files(t)), "--out", o], ["idx"]),
    ("prepare cifar10 not gzip", lambda t, d, o: ["data", "prepare", "cifar10", "--src",
                                                  _config(t, "plain text", "cifar-10-python.tar.gz"), "--out", o],
     ["cifar-10-python.tar.gz"]),
]


def _idx_files(t):
    for prefix in ("train", "t10k"):
        for kind in ("images-idx3", "labels-idx1"):
            (t / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x56\x78" + bytes(64)))
    return t


def _data_copy(t, d, edit):
    """A copy of the prepared digits with ``edit(path)`` applied; returns its directory."""
    new = t / "data"
    shutil.copytree(d, new)
    edit(new)
    return str(new)


def _manifest(edit):
    def apply(p):
        doc = json.loads((p / "dataset.json").read_text())
        (p / "dataset.json").write_text(json.dumps(edit(doc)))
    return apply


def _truncate(p):
    f = p / "train-000000.tar"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _data_case(name, edit, frag, zca=True):
    """``teachers train`` on a damaged data copy; data.zca makes the driver read the train shards itself."""
    return (name, lambda t, d, o: ["teachers", "train", DIGITS, *TINY, "--set", f"data.dir={_data_copy(t, d, edit)}",
                                   *(["--set", "data.zca=true"] if zca else []), "--out", o], [frag])


DATA_CASES = [
    _data_case("dataset.json not JSON", lambda p: (p / "dataset.json").write_text("{oops"), "dataset.json"),
    _data_case("dataset.json a list", lambda p: (p / "dataset.json").write_text("[]"), "dataset.json"),
    _data_case("dataset.json without shape", _manifest(lambda m: {k: v for k, v in m.items() if k != "shape"}),
               "dataset.json"),
    _data_case("dataset.json negative shape", _manifest(lambda m: {**m, "shape": [1, -8, 8]}), "shape"),
    _data_case("dataset.json num_classes 0", _manifest(lambda m: {**m, "num_classes": 0}), "num_classes"),
    _data_case("dataset.json shards a string", _manifest(lambda m: {**m, "shards": "x"}), "shards"),
    _data_case("train shard truncated", _truncate, "train-000000.tar"),
    _data_case("train shard missing", lambda p: (p / "train-000000.tar").unlink(), "train-000000.tar"),
    _data_case("train shard replaced by text", lambda p: (p / "train-000000.tar").write_text("x" * 5000),
               "train-000000.tar"),
]


def _syn(edit=None, **kw):
    def make(t, d):
        path = _synset(t / "syn", d, **kw)
        if edit:
            edit(path)
        return str(path)
    return make


def _eval_case(name, make, frag):
    return (name, lambda t, d, o: ["evaluate", DIGITS, "--set", f"data.dir={d}", *TINY, "--set",
                                   "evaluate.modes=[hard]", "--synset", make(t, d), "--out", o], [frag])


def _edit_manifest(edit):
    def apply(p):
        doc = json.loads((p / "manifest.json").read_text())
        (p / "manifest.json").write_text(json.dumps(edit(doc)))
    return apply


SYNSET_CASES = [
    _eval_case("synset dir missing", lambda t, d: str(t / "nosyn"), "nosyn"),
    _eval_case("synset is a file", lambda t, d: _config(t, "x", "synfile"), "synfile"),
    _eval_case("synset without manifest", _syn(lambda p: (p / "manifest.json").unlink()), "manifest.json"),
    _eval_case("synset manifest not JSON", _syn(lambda p: (p / "manifest.json").write_text("{")), "manifest.json"),
    _eval_case("synset tensors tampered", _syn(lambda p: (p / "synset.safetensors").write_bytes(
        (p / "synset.safetensors").read_bytes()[:-4] + b"\0\0\0\0")), "synset.safetensors"),
    _eval_case("synset tensors garbage", _syn(lambda p: (p / "synset.safetensors").write_bytes(b"garbage" * 10)),
               "synset.safetensors"),
    _eval_case("synset tensor file missing", _syn(lambda p: (p / "synset.safetensors").unlink()),
               "synset.safetensors"),
    _eval_case("synset manifest sha256 a number", _syn(_edit_manifest(lambda m: {**m, "sha256": 5})), "sha256"),
    _eval_case("synset manifest file escapes", _syn(_edit_manifest(lambda m: {**m, "file": "../../etc/passwd"})),
               "file"),
    _eval_case("synset num_classes 5 of 10", _syn(_edit_manifest(lambda m: {**m, "num_classes": 5})), "num_classes"),
    _eval_case("synset num_classes a string", _syn(_edit_manifest(lambda m: {**m, "num_classes": "ten"})),
               "num_classes"),
    _eval_case("synset images NaN", lambda t, d: _nan_synset(t, d), "non-finite"),
]


def _nan_synset(t, d):
    from raydd.io import save_tensors, write_json
    x = torch.full((10, 1, 8, 8), float("nan"))
    path = t / "syn"
    sha = save_tensors(path / "synset.safetensors", {"images": x, "labels": torch.arange(10)})
    write_json(path / "manifest.json", {"file": "synset.safetensors", "sha256": sha, "num_classes": 10})
    return str(path)


CASES = [*SUITE_CASES, *SET_CASES, *SYNTAX_CASES, *FILE_CASES, *PREPARE_CASES, *DATA_CASES, *SYNSET_CASES]


def run_case(argv_fn, fragments, workdir: Path, digits: str, timeout: float) -> tuple[str, int | None, str, float]:
    """Build the case's input here, run `raydd` on it in a forked child; returns (outcome, code, stderr, s)."""
    out = workdir / "out"
    err_path, out_path = workdir.parent / f"{workdir.name}.err", workdir.parent / f"{workdir.name}.out"
    t0 = time.time()
    pid = os.fork()
    if pid == 0:   # the child: `raydd ARGV` as the console script runs it
        code = 1
        try:
            os.setsid()   # its own session: whatever it starts is killed with it
            os.chdir(ROOT)
            for fd, path in ((1, out_path), (2, err_path)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            import faulthandler   # a hang leaves the stacks it hung in
            faulthandler.dump_traceback_later(max(1.0, timeout - 2), exit=False)
            try:   # inputs are built here, not in the parent: it must stay free of threads and locks to fork
                argv = argv_fn(workdir, digits, str(out))
            except Exception as e:   # the campaign's own fault, not raydd's
                print(f"campaign setup error: {type(e).__name__}: {e}", file=sys.stderr)
                os._exit(SETUP_EXIT)
            from raydd.cli import main
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    status = None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.time() - t0 > timeout:
            _killpg(pid)
            os.waitpid(pid, 0)
            _killpg(pid)
            return "hang", None, _read(err_path), time.time() - t0
        else:
            time.sleep(0.05)
    _killpg(pid)     # anything the child left running in its session
    code = os.waitstatus_to_exitcode(status)
    err = _read(err_path)
    if code == SETUP_EXIT and err.startswith("campaign setup error"):
        return "setup", code, err, time.time() - t0
    return classify(code, err, fragments), code, err, time.time() - t0


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


ARGPARSE = re.compile(r"^raydd( [\w-]+)*: error: ")


def classify(code: int, err: str, fragments) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if "Traceback (most recent call last)" in err:
        return "traceback"
    if code == 0:
        return "silent"
    if code == 2 and len(lines) == 1 and lines[0].startswith("raydd: error:") \
            and all(f in lines[0] for f in fragments):
        return "clear"
    if code == 2 and lines and lines[0].startswith("usage:") and ARGPARSE.match(lines[-1]):
        return "clear"   # argparse: a usage line and the one error line
    return "unclear"


OUTCOMES = ("clear", "traceback", "silent", "hang", "unclear")
SETUP_EXIT = 97


def _in_child(fn) -> None:
    """Run ``fn`` in a forked child and wait (the parent itself never runs raydd's data code)."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("-k", dest="select", default=None, help="only cases whose name holds this")
    ap.add_argument("--show", action="store_true", help="print the stderr of every case that is not clear")
    args = ap.parse_args()
    names = [c[0] for c in CASES]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, f"case names must be distinct: {sorted(dupes)}"
    cases = [c for c in CASES if args.select is None or args.select in c[0]]
    root = Path(tempfile.mkdtemp(prefix="raydd-bad-inputs-"))
    from raydd.data import prepare
    digits = root / "digits"
    _in_child(lambda: prepare("digits", digits, workers=1))
    assert (digits / "dataset.json").exists(), "preparing the digits failed"
    totals = dict.fromkeys((*OUTCOMES, "setup"), 0)
    t_all = time.time()
    print(f"| # | case | outcome | exit | s | stderr (last line) |\n|---|---|---|---|---|---|", flush=True)
    try:
        for i, (name, argv_fn, fragments) in enumerate(cases, 1):
            work = root / f"case-{i:03d}"
            work.mkdir()
            outcome, code, err, secs = run_case(argv_fn, fragments, work, str(digits), args.timeout)
            totals[outcome] = totals.get(outcome, 0) + 1
            last = (err.strip().splitlines() or [""])[-1][:150].replace("|", "\\|")
            print(f"| {i} | {name} | {outcome} | {code} | {secs:.1f} | {last} |", flush=True)
            if args.show and outcome != "clear":
                shown = err.strip() if len(err) < 3000 else err.strip()[:1500] + "\n…\n" + err.strip()[-1500:]
                print("    " + shown.replace("\n", "\n    "), flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{len(cases)} tried / {totals['clear']} clear / {totals['traceback']} traceback / "
          f"{totals['silent']} silent / {totals['hang']} hang"
          + (f" / {totals['unclear']} unclear" if totals["unclear"] else "")
          + (f" / {totals['setup']} setup errors" if totals.get("setup") else "")
          + f"  ({time.time() - t_all:.0f} s)")
    return 0 if totals["clear"] == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
