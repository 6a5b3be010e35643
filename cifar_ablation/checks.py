"""Value checks: the combinators that say what a config key allows, and the error that names it.

A check returns None for a good value, else a phrase saying what is allowed; `require` turns that phrase into a
ConfigError naming the key, the value and what is allowed. Tricks declare their parameters' checks with these
(tricks.py), config.validate runs every check before any data is read. This module imports nothing of the
package, so everything may import it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

Check = Callable[[Any], "str | None"]
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class UserError(Exception):
    """Something the user can fix (a config value, the data): the CLI prints its message as one `error:` line,
    without a traceback (CIFAR_ABLATION_TRACEBACK=1 shows it)."""


class ConfigError(UserError, ValueError):
    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config: {key}={value!r} is not allowed; {key} must be {allowed}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           integer: bool = False) -> Check:
    left = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
    right = "" if hi is None else f"{'<' if hi_open else '<='} {hi}"
    allowed = (("an integer" if integer else "a number") + " " + " and ".join(s for s in (left, right) if s)).strip()

    def check(v: Any) -> str | None:
        if not _is_number(v) or (integer and not isinstance(v, int)) or v != v:
            return allowed
        if lo is not None and (v < lo or (lo_open and v == lo)):
            return allowed
        if hi is not None and (v > hi or (hi_open and v == hi)):
            return allowed
        return None
    return check


def one_of(*values: str) -> Check:
    return lambda v: None if v in values else "one of " + ", ".join(map(str, values))


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def optional(check: Check) -> Check:
    """null, or what `check` allows."""
    return lambda v: None if v is None else check(v)


def non_empty(what: str) -> Check:
    return lambda v: None if isinstance(v, str) and v else f"a non-empty {what}"


def interval(lo: float, hi: float | None, *, lo_open: bool = False) -> Check:
    """A [a, b] pair of numbers with a <= b inside (lo, hi]."""
    inner = number(lo, hi, lo_open=lo_open)
    allowed = f"a pair [a, b] of numbers with {lo} {'<' if lo_open else '<='} a <= b" + ("" if hi is None else f" <= {hi}")

    def check(v: Any) -> str | None:
        if not isinstance(v, (list, tuple, ListConfig)) or len(v) != 2 or any(inner(x) for x in v) or v[0] > v[1]:
            return allowed
        return None
    return check


def require(cfg: DictConfig, key: str, check: Check) -> None:
    value = OmegaConf.select(cfg, key, default=None)
    allowed = check(value)
    if allowed:
        raise ConfigError(key, value, allowed)


def check_trick_overrides(argv: list[str]) -> None:
    """Hydra reports an unknown option of a multi-select group without listing the valid ones, and only when
    the job that names it starts: check every trick named on the command line (sweeps included) up front."""
    valid = sorted(p.stem for p in (CONF_DIR / "trick").glob("*.yaml"))
    args = [a for a in argv if "=" in a and not a.startswith("-")]
    for o in OverridesParser.create().parse_overrides(args):
        if o.key_or_group != "trick" or o.is_delete():
            continue
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        for v in values:
            for name in v if isinstance(v, list) else [v]:
                if name not in valid:
                    raise ConfigError("trick", name, "a list of known tricks, from: " + ", ".join(valid) +
                                      " (e.g. 'trick=[noise,batchnorm]'; 'trick=[]' is the baseline)")


def check_tracking_uri(uri: str) -> None:
    """No secret in the tracking URI: it would be logged as a param and saved in Hydra's config files (the
    error shows it masked)."""
    password = urlsplit(uri).password
    if password:
        raise ConfigError("mlflow.tracking_uri", uri.replace(password, "***"),
                          "a URI without a password (it would be logged as a param and saved in Hydra's config): "
                          "MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from the environment "
                          "or ~/.mlflow/credentials; a database URI's password goes in PGPASSWORD or ~/.pgpass")


def check_command_line(argv: list[str]) -> None:
    """What must be refused before Hydra starts: an unknown trick (Hydra would not list the valid ones), a
    password in the tracking URI (Hydra would save it in the run's .hydra/overrides.yaml)."""
    check_trick_overrides(argv)
    for a in argv:
        key, _, value = a.partition("=")
        if key.lstrip("+~") == "mlflow.tracking_uri":
            check_tracking_uri(value)
