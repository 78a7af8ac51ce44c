"""Starting or joining Ray from the ``ray`` section of a config.

``address: null`` always starts a private local instance (``address="local"``): a plain
``ray.init()`` would silently join any cluster another process on the machine has started.
"""
from __future__ import annotations

import logging
import os

from .config import RayConfig, Resources
from .errors import ConfigError, RayddError


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
    try:
        ray.init(address=rc.address, **common)
    except Exception as e:
        raise RayddError(f"could not connect to Ray at ray.address={rc.address!r}: {_first_line(e)}") from None


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
