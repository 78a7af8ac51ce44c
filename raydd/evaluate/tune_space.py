"""``param_space`` of :func:`raydd.sweep`: Tune's search-space objects over evaluation settings.

Keys are :class:`~raydd.config.EvalConfig` fields that change what a trial computes (``lr``,
``epochs``, ``weight_decay``, ``soft_temperature``, ``kd.alpha``, ``elf.lambda_front``, …). Values:

* a constant: set for every trial (as a YAML override would);
* a list or ``tune.grid_search`` of ``lr``: the lr search of ``evaluate.lr_search`` (labels ``lrX``);
* ``tune.grid_search`` of any other key, or a domain (``tune.loguniform``, ``tune.choice``,
  ``tune.randint``, …): searched.

Without a ``search_alg`` the searched values are drawn *here*, as Tune's default search does
(every grid point × ``num_samples`` draws of the domains), but from a generator seeded by the run
seed and the space itself: a rerun of the same sweep draws the same values, so every trial is
known — label, key and all — before Tune starts, and resuming reuses finished trials exactly like
an unsearched sweep. With a ``search_alg`` the values are chosen by the searcher as results come
in; see :mod:`raydd.evaluate.tune_run` for how those trials are identified.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from ..config import EvalConfig
from ..errors import ConfigError
from .sources import digest

# EvalConfig fields that choose *which* trials run or *where*, not what a trial computes.
NOT_SETTINGS = {"archs", "modes", "mode_archs", "seeds", "lr", "arch_lr", "lr_search", "baselines",
                "storage_path", "resources", "ars", "val_size", "report_every", "max_concurrent",
                "stack"}


@dataclass
class Space:
    lrs: list[float]                                            # the lr grid (labels lrX when > 1)
    grid: dict[str, list[Any]] = field(default_factory=dict)    # other grid_search keys
    domains: dict[str, Any] = field(default_factory=dict)       # Tune domains

    @property
    def searched(self) -> bool:
        return bool(self.grid or self.domains)

    def tune_params(self) -> dict[str, Any]:
        """The searched part as a Tune param space (for a search_alg)."""
        from ray import tune
        return {**{k: tune.grid_search(v) for k, v in self.grid.items()}, **self.domains}


def is_domain(value: Any) -> bool:
    try:
        from ray.tune.search.sample import Domain
    except ImportError:  # without Ray there are no domains to recognise
        return False
    return isinstance(value, Domain)


def parse_space(ecfg: EvalConfig, space: dict[str, Any]) -> Space:
    """Apply the constants of ``space`` to ``ecfg``; return the lr grid and the searched keys."""
    if not isinstance(space, dict):
        raise ConfigError(f"param_space: {space!r} is invalid; expected a dict setting -> value or domain")
    out = Space(lrs=list(ecfg.lr_search or [ecfg.lr]))
    for key, value in space.items():
        _check_key(ecfg, key)
        grid = isinstance(value, dict) and set(value) == {"grid_search"}
        if grid:
            value = list(value["grid_search"])
        if key == "lr" and (grid or isinstance(value, (list, tuple))):
            if not value or not all(_positive(v) for v in value):
                raise ConfigError(f"param_space['lr']: {value!r} is invalid; expected positive learning rates")
            out.lrs = [float(v) for v in value]
        elif grid:
            if not value:
                raise ConfigError(f"param_space[{key!r}]: an empty grid_search; expected at least one value")
            for v in value:
                apply_params(ecfg, {key: v})   # refused now, before any compute
            out.grid[key] = value
        elif is_domain(value):
            if type(value).__name__ == "Function":
                raise ConfigError(f"param_space[{key!r}]: tune.sample_from is not supported; expected a "
                                  f"domain such as tune.uniform, tune.loguniform, tune.choice or tune.randint")
            out.domains[key] = value
        elif isinstance(value, (list, tuple)):
            raise ConfigError(f"param_space[{key!r}]: {value!r} is a list; expected one value, "
                              f"tune.grid_search([...]) or a domain such as tune.choice([...])")
        elif key == "lr":
            if not _positive(value):
                raise ConfigError(f"param_space['lr']: {value!r} is invalid; expected a positive learning rate")
            out.lrs = [float(plain(value))]
        else:
            set_setting(ecfg, key, value)
    return out


def variants(space: Space, num_samples: int, seed: int) -> list[dict[str, Any]]:
    """Tune's default search drawn reproducibly: every grid point × ``num_samples`` domain draws."""
    import numpy as np

    if not space.searched:
        return [{}]
    rng = np.random.default_rng(int(digest([describe(space.tune_params()), num_samples, seed])[:15], 16))
    keys = sorted(space.grid)
    out = []
    for _ in range(num_samples):
        for point in itertools.product(*(space.grid[k] for k in keys)):
            v = dict(zip(keys, point))
            for k in sorted(space.domains):
                v[k] = plain(space.domains[k].sample(random_state=rng))
            out.append(v)
    return out


def params_label(params: dict[str, Any]) -> str:
    return "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in sorted(params.items()))


def apply_params(ecfg: EvalConfig, params: dict[str, Any]) -> EvalConfig:
    """A copy of ``ecfg`` with ``params`` set (``lr`` excluded: it is the trial's own) and validated."""
    new = dataclasses.replace(ecfg, kd=dataclasses.replace(ecfg.kd), elf=dataclasses.replace(ecfg.elf))
    for key, value in params.items():
        if key != "lr":
            set_setting(new, key, value)
        elif not _positive(value):
            raise ConfigError(f"param_space['lr']: {value!r} is invalid; expected a positive learning rate")
    new.validate("evaluate")
    return new


def set_setting(ecfg: EvalConfig, key: str, value: Any) -> None:
    obj, leaf = _check_key(ecfg, key)
    value = plain(value)
    current = getattr(obj, leaf)
    if type(current) in (int, float) or (current is None and key == "full_epochs"):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (type(current) is not float and not float(value).is_integer()):
            raise ConfigError(f"param_space[{key!r}]: {value!r} is invalid; expected "
                              f"{'a number' if type(current) is float else 'an integer'}")
        value = float(value) if type(current) is float else int(value)
    elif type(current) is not type(value) and current is not None:
        raise ConfigError(f"param_space[{key!r}]: {value!r} is invalid; expected a {type(current).__name__}")
    setattr(obj, leaf, value)


def _check_key(ecfg: EvalConfig, key: str) -> tuple[Any, str]:
    obj, leaf = ecfg, key
    if isinstance(key, str) and "." in key:
        head, leaf = key.split(".", 1)
        obj = {"kd": ecfg.kd, "elf": ecfg.elf}.get(head)
    names = {f.name for f in dataclasses.fields(obj)} if obj is not None else set()
    if key != "lr" and (leaf not in names or (obj is ecfg and leaf in NOT_SETTINGS | {"kd", "elf"})):
        valid = sorted(n for n in {f.name for f in dataclasses.fields(EvalConfig)} - NOT_SETTINGS
                       if n not in ("kd", "elf"))
        raise ConfigError(f"param_space: unknown setting {key!r}; expected lr, one of {', '.join(valid)}, "
                          f"or kd.*/elf.* fields")
    return obj, leaf


def _positive(v: Any) -> bool:
    v = plain(v)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def plain(v: Any) -> Any:
    """numpy scalars (what domains sample) as Python values, so JSON and type checks see them."""
    return v.item() if hasattr(v, "item") and type(v).__module__ == "numpy" else v


def describe(v: Any) -> Any:
    """A JSON-able description of a (nested) search space, for seeds and study keys."""
    if isinstance(v, dict):
        return {str(k): describe(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [describe(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "__dict__"):
        return {type(v).__name__: {k: describe(x) for k, x in sorted(vars(v).items())}}
    return repr(v)
