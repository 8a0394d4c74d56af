"""CLI help that is true: every option of every (nested) subcommand says what it does and its
default, and a model given where a bundle belongs is named as a model."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitedge.bundle import load_bundle
from splitedge.cli import build_parser, main
from splitedge.errors import SplitedgeError
from tests.conftest import ROOT

SB3_ZIP = ROOT / "models" / "zoo" / "cartpole-ppo.sb3.zip"
SKIPPED = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
EMPTY_DEFAULTS = (None, False, "", [], argparse.SUPPRESS)  # nothing worth showing


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ("splitedge",)
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under `parser`, depth first, with its command line ('splitedge bench server')."""
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


ALL = dict(parsers(build_parser()))


def _expanded_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)  # %(default)s and friends filled in


def test_the_walk_reaches_nested_subcommands() -> None:
    for command in ("splitedge bench server", "splitedge bench encoder", "splitedge llm train"):
        assert command in ALL
    assert sum(1 for c in ALL if c.count(" ") >= 2) >= 8  # `bundle verify`, `llm fold`, ...


@pytest.mark.parametrize("command", sorted(ALL))
def test_every_option_has_help_text_and_shows_its_default(command: str) -> None:
    parser = ALL[command]
    parser.format_help()  # renders: no broken %-format in any help string
    missing, no_default = [], []
    for action in parser._actions:
        if isinstance(action, SKIPPED):
            continue
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
            missing.append(name)
        elif action.option_strings and action.default not in EMPTY_DEFAULTS:
            if "default" not in _expanded_help(parser, action):
                no_default.append(f"{name} (default {action.default!r})")
    assert not missing, f"`{command}`: options without help text: {', '.join(missing)}"
    assert not no_default, f"`{command}`: help does not show the default: {', '.join(no_default)}"


def test_top_level_help_names_every_bench_subcommand() -> None:
    top = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    line = next(c.help for c in sub._choices_actions if c.dest == "bench")
    for name in ALL:
        if name.startswith("splitedge bench "):
            assert name.split()[-1] in line, f"`splitedge --help` says bench is {line!r}"


@pytest.mark.parametrize("name", ["cartpole-ppo.sb3.zip", "model.zip"])
def test_an_sb3_model_given_as_a_bundle_is_named_as_a_model(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / name
    shutil.copy(SB3_ZIP, model)
    with pytest.raises(SplitedgeError) as info:
        load_bundle(model)
    message = str(info.value)
    assert "Stable-Baselines3 model, not a bundle" in message and "not found" not in message
    assert f"splitedge export --model {model}" in message
    assert main(["bundle", "verify", str(model)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"splitedge export --model {model}" in err


def test_other_non_bundles_say_what_they_are(tmp_path: Path) -> None:
    with pytest.raises(SplitedgeError, match="not found"):
        load_bundle(tmp_path / "missing")
    other = tmp_path / "other.zip"
    shutil.make_archive(str(other.with_suffix("")), "zip", ROOT / "protos")
    with pytest.raises(SplitedgeError, match="is a zip archive, not a bundle"):
        load_bundle(other)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SplitedgeError, match="is a file, not a bundle"):
        load_bundle(text)
