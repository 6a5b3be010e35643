"""Value checks: the combinators that say what a config key allows, and the error that names it; and the
command line's checks that must come before Hydra starts (unknown tricks and keys, a password in a URI).

A check returns None for a good value, else a phrase saying what is allowed; `require` turns that phrase into a
ConfigError naming the key, the value and what is allowed. Tricks declare their parameters' checks with these
(tricks.py), config.validate runs every check before any data is read. This module imports nothing of the
package, so everything may import it.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import os
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, ListConfig, OmegaConf

Check = Callable[[Any], "str | None"]


def _conf_dir() -> Path:
    """The config tree: the copy a wheel installs inside the package (`pip install .`: the CLI then runs from any
    folder), else conf/ beside the package (a checkout, an editable install)."""
    package = Path(__file__).resolve().parent
    return package / "conf" if (package / "conf" / "config.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()


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


def _overrides(argv: list[str]) -> list[Override]:
    """The command line's overrides (key=value, sweeps included; flags left out), as Hydra parses them."""
    return OverridesParser.create().parse_overrides([a for a in argv if "=" in a and not a.startswith("-")])


def _trick_lists(o: Override) -> list[list[str]]:
    """The trick lists a trick= override chooses: each value of a sweep (trick=[],[noise]), or its one value."""
    values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
    return [v if isinstance(v, list) else [v] for v in values]


def check_trick_overrides(argv: list[str]) -> None:
    """Hydra reports an unknown option of a multi-select group without listing the valid ones, and only when
    the job that names it starts: check every trick named on the command line (sweeps included) up front."""
    valid = sorted(p.stem for p in (CONF_DIR / "trick").glob("*.yaml"))
    for o in _overrides(argv):
        if o.key_or_group != "trick" or o.is_delete():
            continue
        for name in (name for names in _trick_lists(o) for name in names):
            if name not in valid:
                raise ConfigError("trick", name, "a list of known tricks, from: " + ", ".join(valid) +
                                  " (e.g. 'trick=[noise,batchnorm]'; 'trick=[]' is the baseline)")


def check_trick_params(argv: list[str]) -> None:
    """trick.<name>.<param>=v sets a parameter of a trick the run chooses; where a job of the command does not
    choose it, Hydra would fail naming a missing key (and suggest a `+`, which would turn the trick on with
    only that one parameter): refuse it, saying which trick lists lack it and how to set it where it is chosen."""
    overrides = _overrides(argv)
    chosen = [names for o in overrides if o.key_or_group == "trick" and not o.is_delete() for names in _trick_lists(o)]
    experiment = next((o.value() for o in overrides if o.key_or_group == "experiment"), None)
    for o in overrides:
        parts = o.key_or_group.split(".")
        if parts[0] != "trick" or len(parts) < 3 or o.is_delete():
            continue
        name, setting = parts[1], o.input_line.lstrip("+")
        if chosen:
            lacking = [f"trick=[{','.join(names)}]" for names in chosen if name not in names]
        elif experiment is not None:  # a design's sweep: each design has jobs without any one trick
            design = CONF_DIR / "experiment" / f"{experiment}.yaml"
            lacking = [f"the jobs of experiment={experiment} that leave it out"] if (
                design.is_file() and "design_sweep" in design.read_text()) else []
        else:
            lacking = ["trick=[] (the default)"]
        if lacking:
            raise UserError(f"invalid config: {setting} sets a parameter of the {name} trick, but {name} is not "
                            f"chosen by {', '.join(lacking)}: add it to the trick list, or set the parameter "
                            f"wherever {name} is chosen: +ablation.{setting.replace('trick.', 'params.', 1)}")


def check_tracking_uri(uri: str, key: str = "mlflow.tracking_uri") -> None:
    """No secret in the tracking URI: it would be logged as a param and saved in Hydra's config files (the
    error shows it masked). Not MLflow's file store (a path, file:…), which MLflow refuses as it opens it, in
    every job, unless MLFLOW_ALLOW_FILE_STORE is true. `key`: where it was set."""
    parts = urlsplit(uri)
    if parts.password:
        raise ConfigError(key, uri.replace(parts.password, "***"),
                          "a URI without a password (it would be logged as a param and saved in Hydra's config): "
                          "MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from the environment "
                          "or ~/.mlflow/credentials; a database URI's password goes in PGPASSWORD or ~/.pgpass")
    if uri and parts.scheme in ("", "file"):
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE  # only here: MLflow takes a second to import

        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise ConfigError(key, uri, "a database or a server (sqlite:///mlflow.db, postgresql://…, http://…): "
                              "MLflow keeps its file store (a folder such as ./mlruns) in maintenance mode and "
                              "refuses it unless MLFLOW_ALLOW_FILE_STORE=true; `mlflow migrate-filestore` moves one "
                              "into a database")


def node_paths(node: Any, path: str = "") -> Iterator[str]:
    """The dotted path of every node under node, parents first, unresolved (interpolations stay as written);
    at the top, Hydra's own nodes (hydra, defaults) left out."""
    for key in node if isinstance(node, DictConfig) else []:
        if path or key not in ("hydra", "defaults"):
            sub = f"{path}.{key}" if path else str(key)
            yield sub
            yield from node_paths(node._get_node(key), sub)


@functools.cache
def config_keys() -> dict[str, list[str]]:
    """Every node any file of conf/ can put into a composed config, as dotted path -> its keys (a leaf: []),
    with the root as "": config.yaml and every option of every group under its package (the group's name, or
    the file's `# @package`)."""
    nodes: dict[str, list[str]] = {"": []}

    def add(path: str) -> None:
        parent, _, key = path.rpartition(".")
        nodes.setdefault(path, [])
        if key not in nodes.setdefault(parent, []):
            nodes[parent].append(key)

    for f in sorted(CONF_DIR.rglob("*.yaml")):
        group = f.parent.relative_to(CONF_DIR).as_posix()
        if group.split("/")[0] == "hydra":
            continue
        header = f.read_text().split("\n", 1)[0]
        package = header.split("@package", 1)[1].strip() if "@package" in header else group
        prefix = "" if package in (".", "_global_") else package.replace("/", ".")
        parts = prefix.split(".") if prefix else []
        for k in range(1, len(parts) + 1):  # the package's own nodes
            add(".".join(parts[:k]))
        for path in node_paths(OmegaConf.load(f), prefix):
            add(path)
    return nodes


def _is_group(path: str) -> bool:
    """Whether a dotted path names a config group of conf/ (trick, data, ...): its node is filled by options."""
    return (CONF_DIR / path.replace(".", "/")).is_dir()


@functools.cache
def _base() -> DictConfig:
    return OmegaConf.load(CONF_DIR / "config.yaml")


def open_node(key: str) -> str | None:
    """The node above key that config.yaml leaves empty for keys of the user's own (ablation.params: {}), if
    any; a config group's node (trick: {}) is filled by its options, not by the user."""
    parts = key.split(".")
    for k in range(1, len(parts)):
        path = ".".join(parts[:k])
        node = OmegaConf.select(_base(), path, default=None)
        if isinstance(node, DictConfig) and not len(node) and not _is_group(path):
            return path
    return None


def unknown_key(key: str) -> tuple[str, str] | None:
    """None where some file of conf/ has key (or key lies inside one of its leaves: a list's element, which
    Hydra judges); else the first part of key no file has, and what there is instead: "; did you mean
    train.epochs? (train's keys: ...)"."""
    nodes = config_keys()
    if key in nodes:
        return None
    parts = key.split(".")
    known = next(k for k in range(len(parts) - 1, -1, -1) if ".".join(parts[:k]) in nodes)
    parent, children = ".".join(parts[:known]), nodes[".".join(parts[:known])]
    if known and not children:
        return None
    near = difflib.get_close_matches(parts[known], children, n=1, cutoff=0.5)
    where = f"{parent}'s keys" if parent else "the config's top-level keys"
    return (".".join(parts[:known + 1]), (f"; did you mean {'.'.join([*parts[:known], near[0]])}?" if near else "")
            + f" ({where}: {', '.join(sorted(children))})")


def check_override_keys(argv: list[str]) -> None:
    """A key no config file has (a misspelling: train.epochz=3) is refused with the keys its node does have and
    the nearest of them; Hydra would name the key but not what there is. Keys that a file has but this run's
    config may lack (a trick it does not choose) are left to Hydra, and so are `+` and `~` overrides (a key
    added with a + is checked with the composed config: config.validate_keys), Hydra's own keys and config
    groups; and so is a command that brings config files of its own (check_command_line: --config-dir, …)."""
    if any(a.lstrip("+").startswith("hydra.searchpath") for a in argv):
        return
    for o in _overrides(argv):
        key = o.key_or_group
        if (o.is_add() or o.is_force_add() or o.is_delete() or o.package is not None
                or key.split(".")[0] == "hydra" or _is_group(key)):
            continue
        problem = unknown_key(key)
        if problem is None:
            continue
        opened = open_node(key)
        if opened:
            raise UserError(f"invalid config: {problem[0]} is not a key of the config; keys under {opened} are added "
                            f"with a +: +{o.input_line}")
        raise UserError(f"invalid config: {problem[0]} is not a key of the config{problem[1]}")


def command_overrides(argv: list[str]) -> tuple[list[str], bool] | None:
    """(the overrides, whether the config files are this package's) as Hydra's own parser reads the command line;
    None where Hydra composes no config of them (shell completion's install=bash, a rerun) or will refuse the
    command line itself, saying why."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError:
        return None
    if args.shell_completion or args.experimental_rerun:
        return None
    return args.overrides, not (args.config_dir or args.config_path or args.config_name)


def check_command_line(argv: list[str]) -> None:
    """What must be refused before Hydra starts: an unknown trick (Hydra would not list the valid ones), a
    key no config file has (Hydra would not list the ones there are), a trick's parameter where a job does not
    choose the trick (Hydra's advice, a +, would choose it with that one parameter), a password in the tracking
    URI (Hydra would save it in the run's .hydra/overrides.yaml)."""
    parsed = command_overrides(argv)
    if parsed is None:
        return
    overrides, ours = parsed
    check_trick_overrides(overrides)
    if ours:
        check_override_keys(overrides)
    check_trick_params(overrides)
    given = [a.partition("=")[2] for a in overrides if a.partition("=")[0].lstrip("+~") == "mlflow.tracking_uri"]
    for uri in given:
        check_tracking_uri(uri)
    if not given:  # the config's default is MLflow's own variable, where set
        check_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_URI")
