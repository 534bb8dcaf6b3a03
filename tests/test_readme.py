"""Every ``python -m swa_research.train`` command in the README runs as written: it composes,
passes the schema and the checks, and its averaging fits its budget on the data set it names.
Documented errors (``$ command`` followed by ``error: ...``) fail with that message."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import compose_config

from swa_research.config import UserError, iterations_per_epoch, validate_budget
from swa_research.train import load_config

README = Path(__file__).resolve().parent.parent / "README.md"
# Training images of the data sets the README names (the image folder is the CIFAR-10 copy).
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagefolder": 50_000}


def readme_commands() -> list[tuple[str, str | None]]:
    """(command, documented error or None) for every train command in the README."""
    text = README.read_text()
    found: list[tuple[str, str | None]] = []
    in_block = False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and "python -m swa_research.train" in line:
            cmd = line
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            error = None
            if cmd.startswith("$ ") and i + 1 < len(lines) and lines[i + 1].startswith("error:"):
                error = lines[i + 1][len("error: "):]
            found.append((cmd.split(" #")[0].removeprefix("$ ").strip(), error))
        i += 1
    for span in re.findall(r"`(python -m swa_research\.train[^`]*)`", text):
        found.append((" ".join(span.split()), None))
    return found


def overrides_of(command: str) -> list[str]:
    """The overrides a command gives, one value of each swept list, no Hydra-only settings."""
    args = shlex.split(command)
    args = args[args.index("swa_research.train") + 1:]
    out = []
    for a in args:
        if a in ("-m", "--multirun") or a.startswith("-") or a == "job":
            continue
        if a.startswith(("hydra.", "hydra/", "+hydra")):
            continue
        key, _, value = a.partition("=")
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


COMMANDS = readme_commands()


def test_the_readme_has_train_commands() -> None:
    assert len(COMMANDS) >= 12
    assert sum(error is not None for _, error in COMMANDS) >= 2


@pytest.mark.parametrize(("command", "error"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_readme_command_runs_as_written(command: str, error: str | None) -> None:
    try:
        config = load_config(compose_config(overrides_of(command)))
        if config.data.name == "synthetic":
            n_train = config.data.train_size
        else:
            n_train = TRAIN_IMAGES[config.data.name]
        n_train -= int(config.data.val_fraction * n_train)
        t = config.trainer
        validate_budget(config, iterations_per_epoch(n_train, t.batch_size, t.drop_last))
    except UserError as e:
        if error is None:
            raise
        assert str(e) == error
        return
    assert error is None, f"documented to fail with: {error}"
