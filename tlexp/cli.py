"""The console scripts: Hydra entry points that import the heavy modules only when a job runs.

Hydra answers ``--help``, ``--cfg`` and shell tab completion from the configuration alone, so
torch and Lightning (seconds to import) are left out until the task itself starts.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import hydra
from omegaconf import DictConfig

from tlexp.hydra_config import CONFIG_PATH

T = TypeVar("T")


def quiet_when_the_reader_leaves(entry: Callable[[], T]) -> Callable[[], T]:
    """``tlexp-train --help | head -3``: output the reader closed the pipe on ends the command with exit 1 and no
    word, as Unix tools end (Python's recipe, docs.python.org/3/library/signal.html#note-on-sigpipe), not with a
    BrokenPipeError traceback or "Exception ignored ... BrokenPipeError" at exit.

    Not SIGPIPE's default action (SIG_DFL), the other remedy: it would hold for every pipe and socket the process
    writes, not stdout alone (a data-loader worker's queue, a logger's connection to its service), so a run would
    die of the signal mid-epoch with no record and no word, where Python raises an error the run records
    (tlexp.runs.recorded).
    """

    @functools.wraps(entry)
    def run() -> T:
        try:
            try:
                return entry()
            finally:
                sys.stdout.flush()  # what is still buffered fails here, where it is caught, and not at exit
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush: to nowhere
            sys.exit(1)

    return run


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> float | None:
    from tlexp.train import job

    return job(cfg)


@quiet_when_the_reader_leaves
def train() -> None:
    """``tlexp-train``; with ``--cfg``, a config the run would refuse is refused here too (exit 2)."""
    args = sys.argv[1:]
    cfg = composed_or_refused("train", "tlexp-train", args)
    if cfg is not None and {"--cfg", "-c"} & set(args) and not {"-m", "--multirun"} & set(args):
        _refuse_bad_config(cfg)
    _train()


# Hydra's flags that take a value: their value is not an override.
_VALUED = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
           "--info", "--experimental-rerun"}
# Flags after which the arguments are not (only) a run's overrides: Hydra answers them itself.
_NOT_A_RUN = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--config-path", "-cp",
              "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun", "--version"}


def composed_or_refused(config_name: str, tool: str, args: list[str]) -> DictConfig | None:
    """The config ``args`` give (a sweep's first values), or one line and exit 2 where Hydra would print twenty
    lines or a traceback: an option a config group does not have (every value of a sweep), a setting that
    does not exist, a required value not given (but to ``--cfg``, which shows it as ???). None where Hydra
    answers itself (help, another config, its other errors)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from tlexp.hydra_config import initialized

    flags = {a.split("=", 1)[0] for a in args if a.startswith("-")}  # --config-dir=x is --config-dir x
    if _NOT_A_RUN & flags or any("hydra.searchpath" in a for a in args):  # options from elsewhere: Hydra knows them
        return None
    overrides = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in _VALUED)]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        _refuse_home_paths(tool, overrides)
        return None
    with initialized():
        first = []
        for text, override in zip(overrides, parsed):
            try:
                values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            except HydraException:  # an interval or a glob: a search space the sweeper reads
                continue
            options = [] if override.is_delete() else GlobalHydra.instance().config_loader().get_group_options(override.key_or_group)
            chosen = [str(v) for value in values for v in (value if isinstance(value, list) else [value])]  # callbacks=[a,b]
            for value in chosen if options else []:
                if value not in options and not value.startswith("["):
                    _refuse(tool, f"{override.key_or_group}={value}: no such option{_did_you_mean(value, options)}; "
                                  f"the options are {', '.join(options)}")
            first.append(f"{override.get_key_element()}={values[0]}" if override.is_sweep_override() else text)
        try:
            cfg = compose(config_name, overrides=first)
        except HydraException as exc:
            key = _unknown_key(exc)
            if key is None:
                return None
            shown = "--cfg hydra" if key.startswith("hydra.") else "--cfg job"
            _refuse(tool, f"{key} is not a setting{_did_you_mean(key, _known_settings(config_name, first))}: "
                          f"`{tool} {shown}` lists them (+{key}=... adds a new one, for a library that reads it)")
    settings = _settings(cfg)
    missing = [path for path, node in settings.items() if node._is_missing()]
    if missing and not {"--cfg", "-c"} & flags:
        _refuse(tool, f"{missing[0]} has no value: give {missing[0]}=... (`{tool} --help` shows the settings)")
    # +data.batchsize=8: taken, and read by nothing. Lightning's Trainer, the optimizer and callbacks take any key given.
    added = {o.key_or_group for o in parsed if o.is_add() and not o.key_or_group.startswith(_PASSED_ON)}
    existing = [k for k in settings if not any(k == a or k.startswith(f"{a}.") for a in added)]
    for key in sorted(added):
        near = _did_you_mean(key, existing)
        if near:
            print(f"{tool}: warning: +{key} adds a new setting{near}", file=sys.stderr)
    return cfg


def _unknown_key(exc: Exception) -> str | None:
    """The key of Hydra's "Could not override 'x'. To append to your config use +x=...", else None."""
    found = re.match(r"Could not override '([^']+)'\.\s+To append to your config", str(exc))
    return found[1] if found else None


def _known_settings(config_name: str, overrides: list[str]) -> list[str]:
    """The settings there are, for a suggestion: composed without each override Hydra cannot apply."""
    from hydra import compose
    from hydra.errors import HydraException

    while True:
        try:
            return list(_settings(compose(config_name, overrides=overrides)))
        except HydraException as exc:
            key = _unknown_key(exc)
            if key is None:
                return []
            overrides = [o for o in overrides if o.split("=", 1)[0] != key]


_PASSED_ON = ("trainer.", "optim.", "callbacks.", "logger.", "hydra.")


def _settings(cfg: DictConfig, prefix: str = "") -> dict:
    """Every setting's dotted path and node, read without resolving interpolations (some need a running job)."""
    found = {}
    for key in cfg:
        node, path = cfg._get_node(key), f"{prefix}{key}"
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_interpolation() and not node._is_none():
            found |= _settings(node, f"{path}.")
        else:
            found[path] = node
    return found


def _did_you_mean(name: str, known: list[str]) -> str:
    known = [k for k in known if not k.rsplit(".", 1)[-1].startswith("_")]  # _target_ and the like: not a user's setting
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    if not close:  # `lr` for `optim.lr`: the same last part under another group
        close = [k for k in known if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:1]
    return f" (did you mean {close[0]}?)" if close else ""


def _refuse_home_paths(tool: str, overrides: list[str]) -> None:
    """``csv=~/p.csv`` reaches Hydra unexpanded from shells other than bash (or quoted), and its grammar
    reads that ``~`` as the delete operator: four lines of a lexer's error, not a path."""
    for override in overrides:
        key, is_setting, value = override.partition("=")
        if is_setting and value.startswith("~"):
            _refuse(tool, f"{override}: Hydra reads a ~ after = as its delete operator: quote the value for Hydra, "
                          f"\"{key}='{value}'\" (tlexp expands the ~), or give the whole path")


def _refuse(tool: str, message: str) -> NoReturn:
    print(f"{tool}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _refuse_bad_config(cfg: DictConfig) -> None:
    """Run on the config ``--cfg`` shows the checks a job runs first (tlexp/config.py, the strategy name)."""
    from tlexp.config import check_config
    from tlexp.errors import TlexpError
    from tlexp.model.strategies import parse_strategy

    try:
        check_config(cfg)
        parse_strategy(cfg.strategy)
    except TlexpError as exc:
        _refuse("tlexp-train", str(exc))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def _predict(cfg: DictConfig) -> None:
    from tlexp.predict import job

    job(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def _export(cfg: DictConfig) -> None:
    from tlexp.export import job

    job(cfg)


@quiet_when_the_reader_leaves
def predict() -> None:
    """``tlexp-predict``."""
    composed_or_refused("predict", "tlexp-predict", sys.argv[1:])
    _predict()


@quiet_when_the_reader_leaves
def export() -> None:
    """``tlexp-export``."""
    composed_or_refused("export", "tlexp-export", sys.argv[1:])
    _export()


@quiet_when_the_reader_leaves
def table() -> int:
    """``tlexp-table``: an argparse tool (tlexp.report.table), here for the closed pipe's handling the others have."""
    from tlexp.report.table import main

    return main()
