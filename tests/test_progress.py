"""Progress inside an epoch: the live bar, the periodic log lines (`trainer.progress=line`, and
`auto` outside a terminal, as on a cluster) and `none`."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config

from swa_research.tracking.progress import Progress
from swa_research.training.build import train


class Clock:
    """A hand-moved monotonic clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "swa_research.tracking.progress"
            and ": iteration " in r.getMessage()]


def test_a_line_every_interval_with_loss_speed_and_time_left(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = Progress("line", total=5, clock=clock)
    loss_sum = torch.tensor(0.0)
    with caplog.at_level(logging.INFO, logger="swa_research.tracking.progress"):
        clock.now += 10
        progress.update(2, 3, 1, loss_sum + 128 * 2.5, 128)  # 10 s < 30 s: nothing yet
        assert lines(caplog) == []
        clock.now += 30  # 40 s after the start, 2 iterations done: 20 s each, 3 left
        progress.update(2, 3, 2, loss_sum + 256 * 2.25, 256)
        clock.now += 5
        progress.update(2, 3, 3, loss_sum + 384 * 2.0, 384)  # 5 s after the last line
    assert lines(caplog) == ["epoch 2/3: iteration 2/5 (40%), train loss 2.2500, 6 images/s, "
                             "epoch done in 1:00"]


def test_no_line_after_the_last_iteration_and_hours_in_the_time_left(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = Progress("line", total=1000, clock=clock, unit="tokens")
    with caplog.at_level(logging.INFO, logger="swa_research.tracking.progress"):
        clock.now += 40
        progress.update(1, 1, 10, torch.tensor(12.8), 1280)  # 4 s per iteration, 990 left
        clock.now += 4000
        progress.update(1, 1, 1000, torch.tensor(0.0), 128000)
    assert lines(caplog) == ["epoch 1/1: iteration 10/1000 (1%), train loss 0.0100, "
                             "32 tokens/s, epoch done in 1:06:00"]  # the task's unit


def test_a_resumed_epoch_counts_speed_from_where_it_resumed(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = Progress("line", total=10, done=6, seen=768, clock=clock)
    with caplog.at_level(logging.INFO, logger="swa_research.tracking.progress"):
        clock.now += 32  # 2 iterations (256 images) since the resume: 16 s each, 2 left
        progress.update(4, 9, 8, torch.tensor(1024.0), 1024)
    assert lines(caplog) == ["epoch 4/9: iteration 8/10 (80%), train loss 1.0000, 8 images/s, "
                             "epoch done in 0:32"]


def test_auto_is_the_bar_in_a_terminal_and_lines_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert Progress("auto", 10).mode == "line"
    terminal = Tty()
    monkeypatch.setattr("sys.stderr", terminal)
    progress = Progress("auto", 10)
    assert progress.mode == "bar"
    progress.update(1, 2, 5, torch.tensor(640.0), 640)
    progress.close()
    assert "epoch 1/2 [===============               ] 5/10 loss 1.0000" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r\033[K")


def test_none_shows_nothing_and_never_reads_the_loss(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    clock = Clock()
    progress = Progress("none", 3, clock=clock)

    class Unreadable:
        def item(self) -> float:
            raise AssertionError("the loss was read")

    with caplog.at_level(logging.INFO, logger="swa_research.tracking.progress"):
        for done in (1, 2, 3):
            clock.now += 100
            progress.update(1, 1, done, Unreadable(), 128 * done)  # type: ignore[arg-type]
        progress.close()
    assert err.getvalue() == "" and lines(caplog) == []


def test_a_run_with_progress_lines_logs_them(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Progress, "line_every_s", 0.0)  # a line after every iteration
    cfg = compose_config([*TINY, "trainer.progress=line", "trainer.epochs=2"])
    with caplog.at_level(logging.INFO, logger="swa_research.tracking.progress"):
        train(cfg, tmp_path / "run")
    got = lines(caplog)
    iters = int(got[0].split("/")[2].split()[0])  # "epoch 1/2: iteration 1/N (...)"
    assert iters >= 2
    # Every iteration but the last of each epoch, whose summary follows.
    assert len(got) == 2 * (iters - 1)
    assert got[0].startswith(f"epoch 1/2: iteration 1/{iters} (")
    assert got[-1].startswith(f"epoch 2/2: iteration {iters - 1}/{iters} (")
    losses = [float(line.split("train loss ")[1].split(",")[0]) for line in got]
    assert all(0 < v < 10 for v in losses)
