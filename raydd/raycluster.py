"""Starting or joining Ray from the ``ray`` section of a config.

``address: null`` always starts a private local instance (``address="local"``): a plain
``ray.init()`` would silently join any cluster another process on the machine has started.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .config import RayConfig, Resources
from .errors import ConfigError, RayddError

CONNECT_TIMEOUT_S = 30   # joining a cluster; Ray alone retries an address without a cluster for 10+ minutes
PROBE_TIMEOUT_S = 10     # the TCP probe of ray.address before Ray is asked


def init_ray(rc: RayConfig | None = None, *, progress: bool = True) -> None:
    """Start (or connect to) Ray once per process; a second call is a no-op. With ``progress``, a line
    on stderr before and after: a local start takes seconds, joining a cluster up to CONNECT_TIMEOUT_S."""
    import ray

    if ray.is_initialized():
        return
    rc = rc or RayConfig()
    t0 = time.monotonic()
    # No usage-stats reporting: nothing may leave the machine. Ray's processes inherit it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if rc.address is None:
        # Token authentication stays on (Ray's default for a local start); only the notice that
        # says so on every start is silenced. Warnings about auth being *off* still print.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_no_token_notice)
        if progress:
            cpus = _count(rc.num_cpus, "CPU") if rc.num_cpus is not None else f"all {_count(os.cpu_count(), 'CPU')}"
            _say(f"starting a local Ray ({cpus}) …")
        try:
            ray.init(address="local", num_cpus=rc.num_cpus, num_gpus=rc.num_gpus,
                     include_dashboard=False, **common)
        except Exception as e:  # Ray raises assorted types when the local start fails
            raise RayddError(f"could not start a local Ray instance: {_first_line(e)}") from None
        private_token()
        _record_local_ray()
        if progress:
            _say(f"local Ray up: {_resources_text()} ({time.monotonic() - t0:.1f} s)")
        return
    if rc.num_cpus is not None or rc.num_gpus is not None:
        raise ConfigError(f"ray.num_cpus/ray.num_gpus size a local Ray only; drop them or ray.address "
                          f"({rc.address!r}), whose resources are the cluster's")
    _probe(rc.address)
    if progress:
        _say(f"connecting to the Ray cluster at {rc.address} …")
    try:
        with _deadline(CONNECT_TIMEOUT_S):
            ray.init(address=rc.address, **common)
    except _TimedOut:
        raise RayddError(f"could not connect to Ray at ray.address={rc.address!r}: no Ray cluster answered "
                         f"within {CONNECT_TIMEOUT_S} s; expected the address of a running head node "
                         f"(`ray start --head` prints it)") from None
    except Exception as e:
        raise RayddError(f"could not connect to Ray at ray.address={rc.address!r}: {_first_line(e)}") from None
    if progress:
        _say(f"connected to Ray at {rc.address}: {_resources_text()} ({time.monotonic() - t0:.1f} s)")


def _say(text: str) -> None:
    print(f"[ray] {text}", file=sys.stderr, flush=True)


def _resources_text() -> str:
    """What the running Ray offers, e.g. ``1 node, 2 CPUs, 0 GPUs``."""
    import ray
    try:
        total = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    except Exception:   # informative only: never a reason to fail the start
        return "resources unknown"
    return f"{_count(nodes, 'node')}, {_count(total.get('CPU', 0), 'CPU')}, {_count(total.get('GPU', 0), 'GPU')}"


def _count(n: float, word: str) -> str:
    return f"{n:g} {word}{'' if n == 1 else 's'}"


def _probe(address: str) -> None:
    """Refuse at once an address where nothing listens: Ray itself retries such a one for many minutes."""
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them (the deadline still bounds the wait)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
        raise RayddError(f"could not connect to Ray at ray.address={address!r}: {why}; expected the address "
                         f"of a running head node (`ray start --head` prints it)") from None


class _TimedOut(BaseException):
    """Not an Exception: Ray's connect loop retries on every Exception and would swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt the body after ``seconds`` (main thread only; elsewhere the body runs unbounded).
    Ray blocks in native code between retries, so the interrupt lands at its next retry."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise _TimedOut()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def private_token(path: str | os.PathLike | None = None) -> None:
    """Ray writes the token it generates on a local start world-readable (0644); a secret is 0600."""
    path = os.path.expanduser(path or os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token")
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:   # no token file (auth off, or the token comes from RAY_AUTH_TOKEN)
        pass


def _no_token_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled" not in record.getMessage()


def task_threads(res: Resources) -> int:
    """Torch threads for a task holding ``res``: its whole CPUs, at least one."""
    return max(1, int(res.cpus))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------- orphans of a killed driver
# A local Ray's GCS and raylet die with the driver that started them (the kernel's parent-death
# signal), but a SIGKILLed driver leaves the raylet's DashboardAgent and RuntimeEnvAgent running,
# listening on ports, for a minute or more. raydd records every process of a local Ray it starts in
# the run directories this process holds (RUN/.raydd-ray.json); whoever claims such a directory next
# stops the recorded processes of a driver that is dead. A process is identified by pid *and* start
# time on the same host and boot, so a reused pid, a live run, or a Ray cluster started by anyone
# else (`ray start`, another program's ray.init) is never touched.
RAY_RECORD = ".raydd-ray.json"
_held_dirs: list[Path] = []          # run directories this process holds (rundir.lock)
_local_ray: dict | None = None       # the record of the local Ray this process started


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if fields[0] != b"Z" else None   # a zombie is dead already


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc(pid: int) -> dict[str, Any] | None:
    start = _start_time(pid)
    if start is None:
        return None
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    return {"pid": pid, "start": start, "cmd": cmd[:160]}


def _alive(p: dict[str, Any]) -> bool:
    return _start_time(int(p["pid"])) == p.get("start")


def _record_local_ray() -> None:
    """Right after a local start every Ray process is a descendant of this driver: record them."""
    global _local_ray
    if not os.path.isdir("/proc"):
        return
    session = _session()
    procs = [p for p in map(_proc, _descendants(os.getpid())) if p is not None and "ray" in p["cmd"]]
    _local_ray = {"driver": _proc(os.getpid()), "host": socket.gethostname(), "boot_id": _boot_id(),
                  "session_dir": session, "processes": procs}
    for run_dir in _held_dirs:
        _write_record(run_dir)


def _session() -> str | None:
    try:
        import ray
        return ray._private.worker._global_node.get_session_dir_path()
    except Exception:   # a private API: the record works without the session's name
        return None


def _write_record(run_dir: Path) -> None:
    from .io import write_json
    if not run_dir.is_dir():
        return
    try:
        write_json(run_dir / RAY_RECORD, _local_ray)
    except OSError:
        pass   # a best-effort aid to the next run; never a reason to fail this one


def adopt_run_dir(run_dir: Path) -> None:
    """Called once this process holds ``run_dir``'s lock: stop what a dead driver of it left, and record
    the local Ray of this process there (now, or when it starts)."""
    reap_orphans(run_dir)
    _held_dirs.append(run_dir)
    if _local_ray is not None and "ray" in sys.modules and sys.modules["ray"].is_initialized() \
            and _session() == _local_ray["session_dir"]:   # still the Ray this process started
        _write_record(run_dir)


def forget_run_dir(run_dir: Path) -> None:
    """``run_dir`` is no longer held (rundir.release): record nothing more there."""
    _held_dirs[:] = [d for d in _held_dirs if d != run_dir]


def reap_orphans(run_dir: Path) -> list[int]:
    """SIGKILL the still-running processes of the local Ray recorded in ``run_dir`` if the driver that
    started it is dead; returns their pids. A record of a live driver or another host is left alone."""
    path = Path(run_dir) / RAY_RECORD
    try:
        rec = json.loads(path.read_text())
        driver, procs = rec["driver"], list(rec["processes"])
        same_machine = rec.get("host") == socket.gethostname() and rec.get("boot_id") == _boot_id()
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)   # torn or edited: nothing in it can be trusted
        return []
    if not same_machine or driver is None or _alive(driver):
        return []
    killed = []
    for p in procs:
        if isinstance(p, dict) and isinstance(p.get("pid"), int) and p["pid"] != os.getpid() and _alive(p):
            try:
                os.kill(p["pid"], signal.SIGKILL)
                killed.append(p["pid"])
            except OSError:     # gone meanwhile, or not ours to signal
                pass
    if killed:
        print(f"raydd: stopped {len(killed)} Ray processes left by the killed raydd driver pid {driver['pid']} "
              f"of {run_dir} (session {rec.get('session_dir')}): pids {' '.join(map(str, killed))}",
              file=sys.stderr, flush=True)
    path.unlink(missing_ok=True)
    return killed
