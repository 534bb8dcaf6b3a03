"""Shared fixtures: Hydra's compose API over the package's conf/, and tiny-run overrides."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import swa_research
from swa_research.conf import register_configs

# The test models are tiny: threads buy nothing, and OpenMP threads that spin-wait slow a run
# down by an order of magnitude when another process shares the two cores.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

CONF_DIR = Path(swa_research.__file__).parent / "conf"
GROUPS = ("task", "data", "model", "optimizer", "schedule", "swa", "trainer", "logger",
          "experiment")

# Any experiment runs in about a second on a CPU with these after it. Group choices given on
# the command line win over an experiment's `override /group: ...`, so `experiment=paper_vgg16`
# followed by these still trains on synthetic data (tests/test_config.py checks that).
TINY: list[str] = [
    "data=synthetic",
    "data.train_size=128",
    "data.test_size=64",
    "model.width=0.0625",
    "trainer.epochs=2",
    "trainer.batch_size=32",
    "trainer.eval_batch_size=64",
    "trainer.num_workers=0",
    "trainer.progress=none",
    "trainer.device=cpu",
    "swa.start=0.5",
    "swa.freq=1",
]


FAULT_DIR = Path(__file__).parent / "faultinject"


def fault_env(spec: str | None, once: Path | None = None) -> dict[str, str]:
    """Environment variables that make a Python process (and those it starts) stop at a named
    point: see tests/faultinject/sitecustomize.py. None: no fault (the variables cleared)."""
    if not spec:
        return {"SWA_RESEARCH_FAULT": "", "SWA_RESEARCH_FAULT_ONCE": ""}
    path = os.pathsep.join(p for p in (str(FAULT_DIR), os.environ.get("PYTHONPATH")) if p)
    env = {"SWA_RESEARCH_FAULT": spec, "PYTHONPATH": path}
    if once is not None:
        env["SWA_RESEARCH_FAULT_ONCE"] = str(once)
    return env


class StepCrash:
    """In this process, the trainer's n-th optimizer step raises ``RuntimeError("crash at step
    n")`` (a crash after the last checkpoint); ``counting()`` then lets every step run and counts
    them in ``steps`` (the steps a resume takes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int) -> None:
        from swa_research.training.step import TrainStep

        self.n, self.steps, self.crash = n, 0, True
        original = TrainStep.__call__

        def step(trainer_step: Any, *a: Any) -> Any:
            self.steps += 1
            if self.crash and self.steps == self.n:
                raise RuntimeError(f"crash at step {self.n}")
            return original(trainer_step, *a)

        monkeypatch.setattr(TrainStep, "__call__", step)

    def counting(self) -> StepCrash:
        self.steps, self.crash = 0, False
        return self

    def again(self) -> StepCrash:
        self.steps, self.crash = 0, True
        return self


def make_average(model: torch.nn.Module, method: str, decay: float = 0.999,
                 bn_update: bool = True) -> Any:
    """An average of ``model`` from the registry, as a run with swa.method=METHOD builds it."""
    from swa_research.config import SwaConfig
    from swa_research.training.averages import build_averages

    return build_averages(model, SwaConfig(method=method, decay=decay,
                                           bn_update=bn_update))["swa"]


def group_options(group: str) -> list[str]:
    """The options of a config group, from the yaml files in conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with ``overrides`` as the command line would."""
    register_configs()  # conf/config.yaml builds on the structured schema
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="swa_research.conf", version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides or []))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def compose() -> Iterator[Callable[..., DictConfig]]:
    yield compose_config
    GlobalHydra.instance().clear()


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)
