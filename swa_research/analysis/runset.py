"""The runs a sweep report reads: each run dir's config, overrides, metrics.json and W&B record
(:func:`load_run`), the override keys that differ between them (the configurations), and how
a value is shown in a label."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swa_research.config import flatten_dict
from swa_research.tracking.runs import read_run


@dataclass
class WandbTarget:
    project: str
    entity: str | None
    group: str | None
    mode: str


@dataclass
class Run:
    path: Path
    name: str  # relative to the report's folder
    overrides: dict[str, str]
    config: dict[str, Any]  # flattened .hydra/config.yaml
    choices: dict[str, str | None]  # config group -> option, from .hydra/hydra.yaml
    metrics: dict[str, Any] | None
    status: str
    error: str | None = None
    wandb: WandbTarget | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def seed(self) -> Any:
        return self.config.get("seed", self.overrides.get("seed"))

    def value(self, key: str) -> Any:
        """A key's value in this run: the resolved config value when it is a config key
        (so 1e-3 and 0.001 agree), the chosen option for a config group, else the override
        as written; None when the run does not set it."""
        if key in self.config:
            return self.config[key]
        if key in self.choices:
            return self.choices[key]
        return self.overrides.get(key)

    def metric(self, path: tuple[str, ...]) -> float | None:
        node: Any = self.metrics
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return float(node) if isinstance(node, (int, float)) and math.isfinite(node) else None


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """Hydra override strings -> {key: value as written}; `+`/`++` prefixes dropped."""
    out: dict[str, str] = {}
    for line in lines:
        key, sep, value = str(line).partition("=")
        key = key.lstrip("+")
        out[key] = value if sep else ""
    return out


def _wandb_target(run_dir: Path, config: dict[str, Any], hydra_cfg: dict[str, Any]
                  ) -> WandbTarget | None:
    from swa_research.tracking.loggers import resolve_mode

    mode = resolve_mode(str(config.get("logger.mode") or "auto"))
    if config.get("logger.backend") != "wandb" or mode == "disabled":
        return None

    group = config.get("logger.group")
    if group is None:
        # As the entry point named it: one group per multirun, the sweep folder's name.
        if hydra_cfg.get("mode") == "MULTIRUN":
            sweep_dir = str((hydra_cfg.get("sweep") or {}).get("dir", ""))
            group = Path(sweep_dir).name if sweep_dir and "${" not in sweep_dir \
                else run_dir.parent.name
    return WandbTarget(project=str(config.get("logger.project") or "swa_research"),
                       entity=config.get("logger.entity"), group=group,
                       mode=mode)


def load_run(run_dir: Path, root: Path) -> Run:
    record = read_run(run_dir)
    config = flatten_dict(record.config)
    choices = {k: None if v is None else str(v) for k, v in
               ((record.hydra.get("runtime") or {}).get("choices") or {}).items()
               if not k.startswith("hydra/")}
    try:
        name = run_dir.relative_to(root).as_posix()
    except ValueError:
        name = run_dir.as_posix()
    return Run(path=run_dir, name=name if name != "." else run_dir.name,
               overrides=parse_overrides(record.overrides), config=config, choices=choices,
               metrics=record.metrics, status=record.status, error=record.error,
               wandb=_wandb_target(run_dir, config, record.hydra))


def _ignored(key: str) -> bool:
    return key == "seed" or key == "hydra" or key.startswith(("hydra.", "hydra/"))


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """The override keys whose value is not the same in every run, in order of appearance."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if not _ignored(k) and k not in keys]
    return [k for k in keys if len({repr(run.value(k)) for run in runs}) > 1]


def show(value: Any) -> str:
    """A short rendering: 0.0005, 1e-12, 3, true, simplified. A float is shown with at most 12
    significant digits, so that 3 * 1e-4 (0.00030000000000000003) reads 0.0003: the rounding
    noise of an arithmetic sweep is not part of the value a researcher set."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else f"{value:.12g}"
    return "-" if value is None else str(value)
