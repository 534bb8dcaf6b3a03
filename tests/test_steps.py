"""Budgets and cadences in optimizer steps (trainer.max_steps, eval_every_steps,
checkpoint_every_steps): a run in steps equals the same run in epochs where both say the same
budget, ends inside an epoch when its budget does, and resumes from a checkpoint written inside
an epoch as if it had not stopped."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, StepCrash, compose_config

from swa_research.config import UserError
from swa_research.training.build import train

# 142 images, 14 held out for validation: 128 in batches of 32, 4 steps an epoch.
STEPS = 4
SIZE = "data.train_size=142"


def run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict[str, Any], list[dict]]:
    run_dir = tmp_path / name
    metrics = train(compose_config([*TINY, SIZE, "trainer.deterministic=true", *overrides]),
                    run_dir)
    with open(run_dir / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return metrics, rows


def weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"{name}.pt", map_location="cpu")["state_dict"]


@pytest.mark.parametrize("unit", ["iter", "epoch"])
def test_a_budget_in_steps_is_the_same_run_as_the_same_budget_in_epochs(tmp_path: Path,
                                                                        unit: str) -> None:
    """swa.start=0.5 is half of either budget: 8 steps and 2 epochs of 4 train, average and
    report alike, to the last bit."""
    common = [f"swa.unit={unit}", "swa.start=0.5", "swa.freq=1"]
    m_ep, rows_ep = run(tmp_path, "epochs", *common, "trainer.epochs=2")
    m_st, rows_st = run(tmp_path, "steps", *common, "trainer.epochs=50",
                        f"trainer.max_steps={2 * STEPS}")
    assert m_st["train"]["iterations"] == m_ep["train"]["iterations"] == 2 * STEPS
    assert m_st["swa"]["n_averaged"] == m_ep["swa"]["n_averaged"] > 0
    assert rows_st == rows_ep
    for name in ("sgd_final", "swa"):
        a, b = weights(tmp_path / "epochs", name), weights(tmp_path / "steps", name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_budget_in_steps_ends_inside_an_epoch(tmp_path: Path) -> None:
    """6 steps: one epoch and half of the next. swa.start=0.5 (unit iter) is step 3: the
    average holds the weights after steps 4, 5 and 6 (n > start), and the last row says 1.5
    epochs."""
    m, rows = run(tmp_path, "six", "swa.unit=iter", "swa.start=0.5", "swa.freq=1",
                  "trainer.max_steps=6")
    assert m["train"]["iterations"] == 6
    assert m["swa"]["n_averaged"] == 3
    assert [(r["epoch"], r["iteration"]) for r in rows] == [("1", "4"), ("1.5", "6")]


def test_evaluations_every_n_steps(tmp_path: Path) -> None:
    """eval_every_steps=2 over two epochs of 4 steps: rows at steps 2, 4, 6, 8, each with the
    training loss of its two steps; two rows together are the epoch's loss of the run that
    evaluates by epochs, and the rows at epoch ends score the same weights."""
    _, by_epoch = run(tmp_path, "epochs", "trainer.epochs=2")
    _, by_steps = run(tmp_path, "steps", "trainer.epochs=2", "trainer.eval_every_steps=2")
    assert [r["iteration"] for r in by_steps] == ["2", "4", "6", "8"]
    assert [r["epoch"] for r in by_steps] == ["0.5", "1", "1.5", "2"]
    for k, epoch_row in enumerate(by_epoch):
        a, b = by_steps[2 * k], by_steps[2 * k + 1]
        pair = (float(a["train_loss"]) + float(b["train_loss"])) / 2
        assert pair == pytest.approx(float(epoch_row["train_loss"]), rel=1e-12)
        for key in ("sgd_val_loss", "sgd_test_loss", "swa_test_loss", "swa_n_averaged"):
            assert b[key] == epoch_row[key], key


def test_a_checkpoint_inside_an_epoch_resumes_bit_for_bit(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """checkpoint_every_steps=3 with evaluations every 5 steps over 10 steps: a crash at step 8
    resumes from step 6 (inside epoch 2, with 1 step of the evaluation window) and ends as the
    run that never stopped: history, SGD weights and the average."""
    args = ["trainer.max_steps=10", "trainer.checkpoint_every_steps=3",
            "trainer.eval_every_steps=5", "swa.unit=iter", "swa.start=0.3"]
    m_ref, rows_ref = run(tmp_path, "ref", *args)
    crash = StepCrash(monkeypatch, 8)
    with pytest.raises(RuntimeError, match="crash at step 8"):
        run(tmp_path, "resumed", *args)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", map_location="cpu",
                       weights_only=False)
    assert state["iteration"] == 6 and state["partial"]["batch"] == 2
    crash.counting()
    m, rows = run(tmp_path, "resumed", *args)
    assert rows == rows_ref
    assert [r["iteration"] for r in rows] == ["5", "10"]
    assert m["swa"]["n_averaged"] == m_ref["swa"]["n_averaged"] == 7
    for name in ("sgd_final", "swa"):
        a, b = weights(tmp_path / "ref", name), weights(tmp_path / "resumed", name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_snapshots_in_steps_stop_at_the_budget(tmp_path: Path) -> None:
    run(tmp_path, "snap", "trainer.max_steps=7", "trainer.snapshot_every=3",
        "trainer.snapshot_unit=iter", "swa.unit=iter")
    index = json.loads((tmp_path / "snap" / "trajectory" / "index.json").read_text())
    assert [e["iteration"] for e in index["snapshots"]] == [3, 6]


def test_an_epoch_unit_average_refuses_a_budget_ending_inside_an_epoch(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"swa.unit=epoch counts whole epochs.*max_steps=6 ends "
                                        r"inside epoch 2 \(4 steps an epoch\)"):
        run(tmp_path, "refused", "swa.unit=epoch", "trainer.max_steps=6")
    assert not (tmp_path / "refused" / "checkpoint.pt").exists()


@pytest.mark.parametrize("key", ["trainer.max_steps", "trainer.eval_every_steps",
                                 "trainer.checkpoint_every_steps"])
def test_negative_step_counts_are_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=f"{key}=-1: must be >= 0"):
        run(tmp_path, "refused", f"{key}=-1")
