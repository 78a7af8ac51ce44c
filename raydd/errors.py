"""User-facing errors: one line naming the bad value and what was expected."""


class RayddError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


class ConfigError(RayddError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


class DataError(RayddError):
    """A dataset source, shard or manifest is missing, corrupt or inconsistent."""


def brief(value: object) -> str:
    """``repr(value)`` cut to a readable size: an error line quotes user values, and a YAML alias bomb
    or a megabyte string must not turn into a gigabyte line (or never finish)."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset, r.maxstring, r.maxother = 2, 8, 8, 8, 8, 120, 120
    return r.repr(value)
