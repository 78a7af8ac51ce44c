"""Starting or joining Ray from the ``ray`` section of a config.

``address: null`` always starts a private local instance (``address="local"``): a plain
``ray.init()`` would silently join any cluster another process on the machine has started.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from typing import Any, Iterator

from .config import RayConfig, Resources
from .errors import ConfigError, RayddError

CONNECT_TIMEOUT_S = 30   # joining a cluster; Ray alone retries an address without a cluster for 10+ minutes
PROBE_TIMEOUT_S = 10     # the TCP probe of ray.address before Ray is asked


def init_ray(rc: RayConfig | None = None) -> None:
    """Start (or connect to) Ray once per process; a second call is a no-op."""
    import ray

    if ray.is_initialized():
        return
    rc = rc or RayConfig()
    # No usage-stats reporting: nothing may leave the machine. Ray's processes inherit it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = dict(logging_level=logging.WARNING, log_to_driver=True)
    if rc.address is None:
        # Token authentication stays on (Ray's default for a local start); only the notice that
        # says so on every start is silenced. Warnings about auth being *off* still print.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_no_token_notice)
        try:
            ray.init(address="local", num_cpus=rc.num_cpus, num_gpus=rc.num_gpus,
                     include_dashboard=False, **common)
        except Exception as e:  # Ray raises assorted types when the local start fails
            raise RayddError(f"could not start a local Ray instance: {_first_line(e)}") from None
        private_token()
        return
    if rc.num_cpus is not None or rc.num_gpus is not None:
        raise ConfigError(f"ray.num_cpus/ray.num_gpus size a local Ray only; drop them or ray.address "
                          f"({rc.address!r}), whose resources are the cluster's")
    _probe(rc.address)
    try:
        with _deadline(CONNECT_TIMEOUT_S):
            ray.init(address=rc.address, **common)
    except _TimedOut:
        raise RayddError(f"could not connect to Ray at ray.address={rc.address!r}: no Ray cluster answered "
                         f"within {CONNECT_TIMEOUT_S} s; expected the address of a running head node "
                         f"(`ray start --head` prints it)") from None
    except Exception as e:
        raise RayddError(f"could not connect to Ray at ray.address={rc.address!r}: {_first_line(e)}") from None


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
