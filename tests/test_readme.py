"""Every ``python -m swa_research.train`` command in the README and in docs/*.md runs as written:
it composes, passes the schema and the checks, and its averaging fits its budget on the data set
it names. Documented errors (``$ command`` followed by ``error: ...``) fail with that message.
The few documented commands that composing a config cannot check are listed, with the reason,
in NOT_COMPOSABLE, and skipped by name. The other documented commands
(``python -m swa_research.report``, ``... .analysis.flatness``) parse their arguments."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
from conftest import compose_config

from swa_research.config import UserError, iterations_per_epoch
from swa_research.training.averages import check_budget
from swa_research.training.build import load_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# Training images of the data sets the README names (the image folder is the CIFAR-10 copy).
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagefolder": 50_000,
                "imagenet": 1_281_167}
TEXT_WINDOWS = 100_000  # a text's windows per epoch when data.windows_per_epoch=0

# Documented train commands that composing the config cannot check, with the reason. Each must
# still be documented (test_every_skipped_command_is_documented), so the list cannot go stale;
# a command not listed here is checked.
NOT_COMPOSABLE: dict[str, str] = {
    "python -m swa_research.train trainer.resume=/nonexistent/checkpoint.pt":
        "the checkpoint path is checked when the job starts in its run dir, not on composing",
    "python -m swa_research.train hydra.run.dir=outputs/runs/exp1":
        "documents the refusal of a run dir whose lock another running process holds",
    # docs/extending.md: examples of entries a user adds; the toy entries in
    # tests/test_averaging.py, tests/test_models.py and tests/test_tasks.py run the same steps
    # end to end.
    "python -m swa_research.train swa.method=polyak": "an example method, not registered",
    "python -m swa_research.train swa.method=swa swa.also=[polyak]":
        "an example method, not registered",
    "python -m swa_research.train model=mlp model.hidden=256": "an example model, not registered",
    # tests/test_tasks.py trains the same task (tests/regression_task.py) with this override.
    "python -m swa_research.train task=regression trainer.best_by=val_mae":
        "an example task, not registered",
}


def documented_commands(path: Path, module: str = "swa_research.train",
                        inline: bool = True) -> list[tuple[str, str | None]]:
    """(command, documented error or None) for every ``python -m MODULE`` command in a
    Markdown file: in code blocks (with ``\\`` continuations joined), and in inline code when
    ``inline``."""
    text = path.read_text()
    found: list[tuple[str, str | None]] = []
    in_block = False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_block = not in_block
        elif in_block and f"python -m {module}" in line:
            cmd = line
            while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            error = None
            if cmd.startswith("$ ") and i + 1 < len(lines) and lines[i + 1].startswith("error:"):
                error = lines[i + 1][len("error: "):]
            found.append((cmd.split(" #")[0].removeprefix("$ ").strip(), error))
        i += 1
    if inline:
        for span in re.findall(rf"`(python -m {re.escape(module)}[^`]*)`", text):
            found.append((" ".join(span.split()), None))
    return found


def readme_commands() -> list[tuple[str, str | None]]:
    """(command, documented error or None) for every train command in the README."""
    return documented_commands(README)


def docs_commands() -> list[tuple[str, str, str | None]]:
    """(file name, command, documented error or None) for every train command in docs/*.md."""
    return [(p.name, c, e) for p in DOCS for c, e in documented_commands(p)]


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


def check_command(command: str, error: str | None) -> None:
    """Compose, validate and fit the budget; a documented error must be the one raised."""
    try:
        config = load_config(compose_config(overrides_of(command)))
        if config.data.name == "synthetic":
            n_train = config.data.train_size
        elif config.data.name == "text":  # an epoch is windows_per_epoch windows
            n_train = config.data.windows_per_epoch or TEXT_WINDOWS
        else:
            n_train = TRAIN_IMAGES[config.data.name]
        if config.data.name != "text":
            n_train -= int(config.data.val_fraction * n_train)
        t = config.trainer
        check_budget(config, iterations_per_epoch(n_train, t.batch_size, t.drop_last))
    except UserError as e:
        if error is None:
            raise
        assert str(e) == error
        return
    assert error is None, f"documented to fail with: {error}"


COMMANDS = readme_commands()
DOC_COMMANDS = docs_commands()


def test_the_readme_has_train_commands() -> None:
    assert len(COMMANDS) >= 12
    assert sum(error is not None for _, error in COMMANDS) >= 2


def test_the_docs_have_train_commands() -> None:
    # The launchers, W&B and reliability pages each show train commands.
    names = {name for name, _, _ in DOC_COMMANDS}
    assert {"launchers.md", "wandb.md", "reliability.md"} <= names
    assert sum(c not in NOT_COMPOSABLE for _, c, _ in DOC_COMMANDS) >= 5


def test_every_skipped_command_is_documented() -> None:
    documented = {c for _, c, _ in DOC_COMMANDS} | {c for c, _ in COMMANDS}
    assert set(NOT_COMPOSABLE) <= documented, set(NOT_COMPOSABLE) - documented
    # The README's commands are all checked: none of them may be skipped.
    assert not {c for c, _ in COMMANDS} & set(NOT_COMPOSABLE)


@pytest.mark.parametrize(("command", "error"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_readme_command_runs_as_written(command: str, error: str | None) -> None:
    check_command(command, error)


@pytest.mark.parametrize(("name", "command", "error"), DOC_COMMANDS,
                         ids=[f"{n}: {c}" for n, c, _ in DOC_COMMANDS])
def test_docs_command_runs_as_written(name: str, command: str, error: str | None) -> None:
    if command in NOT_COMPOSABLE:
        pytest.skip(f"listed in NOT_COMPOSABLE: {NOT_COMPOSABLE[command]}")
    check_command(command, error)


# The other entry points the README and docs show: their documented flags must parse. Run in
# an empty folder, every path they name is missing, so each stops with exit status 2 ("no such
# folder") after parsing, before reading or writing anything; argparse would exit instead.
OTHER_MODULES = ("swa_research.report", "swa_research.analysis.flatness", "swa_research.posthoc",
                 "swa_research.dashboard")
OTHER_COMMANDS = [(module, c) for module in OTHER_MODULES for p in [README, *DOCS]
                  for c, _ in documented_commands(p, module, inline=False)
                  if c.startswith(f"python -m {module} ")]  # not a file listing's mention


def test_the_docs_have_report_and_flatness_commands() -> None:
    assert {m for m, _ in OTHER_COMMANDS} == set(OTHER_MODULES)


@pytest.mark.parametrize(("module", "command"), OTHER_COMMANDS,
                         ids=[c for _, c in OTHER_COMMANDS])
def test_other_documented_command_parses(module: str, command: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = shlex.split(command)
    args = args[args.index(module) + 1:]
    main = importlib.import_module(module).main
    try:
        code = main(args)
    except SystemExit as e:  # argparse: an unknown flag or a bad value
        pytest.fail(f"{command}: its arguments do not parse (exit {e.code})")
    assert code == 2
    assert list(tmp_path.iterdir()) == []
