"""`metarun --help` says what metarun is and how to start, and its commands really run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.runs import check_ok, run_metarun

CONFIGS = Path(__file__).resolve().parents[1] / "metarun" / "configs"


@pytest.fixture(scope="module")
def help_text(tmp_path_factory) -> str:
    proc = run_metarun("--help", cwd=tmp_path_factory.mktemp("help"), timeout=120)
    check_ok(proc)
    return proc.stdout


def advertised_commands(help_text: str) -> list[list[str]]:
    """The arguments of each `metarun ...` line under "Commands to start with"."""
    block = help_text.split("Commands to start with:\n", 1)[1].split("\n\n", 1)[0]
    commands = []
    for line in block.splitlines():
        match = re.match(r"\s+metarun((?: \S+)*)\s{2,}\S", line + "  x")
        assert match, f"not a command line: {line!r}"
        commands.append(match.group(1).split())
    return commands


def test_help_opens_with_what_metarun_is(help_text):
    assert help_text.startswith("metarun: meta-learning experiments in PyTorch.")
    assert "powered by Hydra." not in help_text  # Hydra's stock header ("cli is powered by ...")
    assert "Usage: metarun [group=option ...] [key=value ...]" in help_text


def test_help_shows_the_commands_to_start_with(help_text):
    commands = advertised_commands(help_text)
    assert [] in commands  # the default run
    assert any(c[:1] == ["-m"] for c in commands)  # a sweep
    assert any(c and c[0].startswith("experiment=") for c in commands)
    assert ["resume=<run", "folder>"] in commands


def test_help_keeps_the_config_groups_and_the_config(help_text):
    groups = help_text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    for group in ("algo", "dataset", "backbone", "optimizer", "experiment"):
        options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}\n" in groups
    config = help_text.split("== Config ==", 1)[1]
    assert "\ntrainer:\n  max_iters:" in config and "\nseed: 0\n" in config
    assert "--hydra-help" in help_text  # the way to Hydra's own flags


@pytest.mark.parametrize("index", range(4))
def test_every_advertised_command_composes(help_text, tmp_path, index):
    runnable = [c for c in advertised_commands(help_text) if not any("<" in a for a in c)]
    assert len(runnable) == 4
    command = runnable[index]
    if command[:1] == ["-m"]:  # --cfg shows one run: each swept key's last value
        command = [re.sub(r"=.*,", "=", arg) for arg in command[1:]]
    proc = run_metarun(*command, "--cfg", "job", cwd=tmp_path, timeout=120)
    check_ok(proc)
    assert "trainer:" in proc.stdout


def test_help_shows_the_config_a_command_composes(tmp_path):
    proc = run_metarun("dataset=omniglot", "--help", cwd=tmp_path, timeout=120)
    check_ok(proc)
    assert proc.stdout.startswith("metarun: ")
    assert "\ntask:\n  ways: 5\n  shots: 1\n" in proc.stdout
