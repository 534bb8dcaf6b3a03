"""What happened to each job of a multirun: read back from the jobs' run dirs."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from swa_research.tasks import TaskMetrics
from swa_research.tracking.runs import NO_METRICS, read_run


@dataclass
class JobResult:
    run_dir: Path
    overrides: list[str]
    status: str  # finished | diverged | failed | preempted | interrupted | missing
    metrics: dict[str, Any] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "finished"


def read_job(run_dir: Path) -> JobResult:
    run = read_run(run_dir)
    if run.status == NO_METRICS:
        return JobResult(run_dir, run.overrides, "failed", None,
                         "no metrics.json: the job stopped before training ended")
    if run.metrics is None:
        return JobResult(run_dir, run.overrides, "failed", None, f"unreadable {run.error}")
    return JobResult(run_dir, run.overrides, run.status if run.status != "unknown" else "failed",
                     run.metrics, run.error)


def sweep_jobs(sweep_dir: Path) -> list[JobResult]:
    """The jobs under a sweep dir: every folder with a .hydra/ inside, in job order."""
    dirs = [p.parent for p in Path(sweep_dir).glob("**/.hydra") if p.is_dir()]

    def key(p: Path) -> tuple[int, str]:
        name = p.relative_to(sweep_dir).as_posix()
        return (int(name), name) if name.isdigit() else (1 << 30, name)

    return [read_job(d) for d in sorted(dirs, key=key)]


def format_summary(sweep_dir: Path, jobs: list[JobResult]) -> str:
    failed = [j for j in jobs if not j.ok]
    lines = [f"sweep {sweep_dir}: {len(jobs)} jobs, {len(jobs) - len(failed)} finished, "
             f"{len(failed)} not finished"]
    for j in jobs:
        name = j.run_dir.relative_to(sweep_dir).as_posix()
        over = ",".join(j.overrides) or "-"
        if j.ok and j.metrics:
            spec = TaskMetrics.of_run(j.metrics)
            key = f"test_{spec.headline}"
            sgd = (j.metrics.get("sgd") or {}).get(key)
            swa = (j.metrics.get("swa") or {}).get(key)
            res = f"sgd test {spec.show(spec.headline, sgd)}  " \
                  f"swa test {spec.show(spec.headline, swa)}"
        else:
            res = (j.error or "").splitlines()[0][:160] if j.error else ""
        lines.append(f"  job {name:>3} {j.status:<11} {over}  {res}")
    return "\n".join(lines)


def print_optuna_result(sweep_dir: Path, sweep_failed: bool = False) -> None:
    """After an Optuna multirun, the best parameters (as overrides) and value, and the path of
    the ``optimization_results.yaml`` that hydra-optuna-sweeper wrote into the sweep dir, on
    stderr. The best is the whole study's: with a persistent storage, earlier commands' trials
    count too. Nothing without that file, or when the sweep failed (the sweeper writes it last,
    so one there is then an earlier command's). Never raises."""
    path = Path(sweep_dir) / "optimization_results.yaml"
    if sweep_failed or not path.is_file():
        return
    try:
        res = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        print(f"warning: unreadable {path}: {e}", file=sys.stderr)
        return
    if not isinstance(res, dict):
        return

    def params(p: Any) -> str:
        return " ".join(f"{k}={v}" for k, v in (p or {}).items()) or "-"

    if "solutions" in res:  # several objectives: the Pareto front
        lines = [f"Optuna Pareto front: {len(res['solutions'] or [])} solutions"]
        lines += [f"  values {s.get('values')}: {params(s.get('params'))}"
                  for s in res["solutions"] or []]
    else:
        lines = [f"Optuna best value: {res.get('best_value')}",
                 f"Optuna best parameters: {params(res.get('best_params'))}"]
    lines.append(f"Optuna results: {path}")
    print("\n".join(lines), file=sys.stderr, flush=True)
