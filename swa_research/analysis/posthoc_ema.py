"""Post-hoc EMA (Karras et al. 2024, EDM2, Section 3.2): the power-function EMA of any relative
width, at any step where the run saved its profiles (``trainer.posthoc_ema``), reconstructed by
least squares from the saved profiles (:func:`swa_research.averaging.power_ema.
posthoc_ema_coefficients`), given fresh BN statistics where the model has BN and evaluated:
``python -m swa_research.posthoc RUN_DIR --ema-sigma-rel 0.02,0.05,0.1 [--at STEP]`` (without
values: :data:`DEFAULT_SIGMA_RELS`). The rows go into ``posthoc.csv`` beside the snapshot grid's
(``kind`` posthoc_ema, its ``sigma_rel``), and ``posthoc_ema.png`` draws the validation loss
against sigma_rel with the run's SGD and online SWA marked (EDM2's Figure 5 kind of plot).
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swa_research.averaging import average_states
from swa_research.averaging.power_ema import MAX_SIGMA_REL
from swa_research.errors import UserError
from swa_research.fileio import load_sharded_state
from swa_research.tracking.plots import pyplot, save_figure
from swa_research.training.posthoc_ema import FOLDER
from swa_research.training.snapshots import INDEX

PLOT_FILE = "posthoc_ema.png"
# EDM2's Figure 5 sweeps about 0.01..0.25; the profiles' own widths are usually 0.05 and 0.10.
DEFAULT_SIGMA_RELS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.13, 0.16, 0.2, 0.25)
_FOLDER_RE = re.compile(r"^sigma_rel_([0-9.eE+-]+)$")

Profile = tuple[float, int, Path]  # (sigma_rel, the step it was saved at, its file)


def read_profiles(run_dir: Path) -> list[Profile]:
    """Every saved profile of the run (an empty list when it saved none)."""
    out: list[Profile] = []
    base = run_dir / FOLDER
    if not base.is_dir():
        return out
    for folder in sorted(base.iterdir()):
        m = _FOLDER_RE.match(folder.name)
        if not m or not (folder / INDEX).is_file():
            continue
        try:
            index = json.loads((folder / INDEX).read_text())
            entries = [(int(e["iteration"]), folder / e["file"]) for e in index["snapshots"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{folder / INDEX} cannot be read ({type(e).__name__})") from None
        out += [(float(m.group(1)), t, path) for t, path in entries]
    return out


def profile_dtypes(run_dir: Path) -> set[str]:
    """The dtypes the run saved its profiles in (trainer.snapshot_dtype): fp32, bf16."""
    out = set()
    for index in (run_dir / FOLDER).glob(f"sigma_rel_*/{INDEX}"):
        try:
            out.add(str(json.loads(index.read_text()).get("dtype", "fp32")))
        except (OSError, ValueError, AttributeError):
            continue  # read_profiles says what is wrong with it
    return out


def check_request(profiles: Sequence[Profile], sigma_rels: Sequence[float], at: int | None,
                  run_dir: Path) -> int:
    """The step to reconstruct at (the last saved by default); a UserError naming the flag."""
    if not profiles:
        raise UserError(f"{run_dir} saved no post-hoc EMA profiles ({FOLDER}/); train with "
                        "trainer.posthoc_ema=[0.05,0.10] trainer.posthoc_ema_every=N")
    if len({s for s, _, _ in profiles}) < 2:
        raise UserError(f"{run_dir}/{FOLDER}: profiles of one width only; the reconstruction "
                        "needs two or more")
    for s in sigma_rels:
        if not 0 < s < MAX_SIGMA_REL:
            raise UserError(f"--ema-sigma-rel: {s:g} is out of range, expected "
                            f"(0, {MAX_SIGMA_REL:.4f})")
    saved = sorted({t for _, t, _ in profiles})
    at = saved[-1] if at is None else at
    if at not in saved:
        raise UserError(f"--at={at}: the profiles were saved at steps {saved[0]}..{saved[-1]} "
                        f"(every {saved[1] - saved[0] if len(saved) > 1 else saved[0]}, and "
                        f"the last); choose one of those")
    return at


def reconstruct(model: nn.Module, profiles: Sequence[Profile], sigma_rel: float, at: int,
                ) -> tuple[nn.Module, int]:
    """A network of ``model``'s architecture holding the power EMA of width ``sigma_rel`` at
    step ``at`` (the library's :func:`~swa_research.averaging.average_states`, which leaves out
    the profiles saved after ``at``); and how many saved profiles it combines."""
    def states() -> Any:
        for _, _, path in profiles:
            try:
                if path.is_dir():  # saved under trainer.strategy=fsdp: each rank its shards
                    yield load_sharded_state(path)
                else:
                    yield torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            except FileNotFoundError:
                raise UserError(f"{path} is listed in its {INDEX} but missing") from None
            except Exception as e:
                raise UserError(f"{path} cannot be read ({type(e).__name__})") from None

    try:
        module = average_states(model, states(), kind="posthoc_ema",
                                times=[t for _, t, _ in profiles],
                                sigma_rels=[s for s, _, _ in profiles], sigma_rel=sigma_rel,
                                at=at)
    except ValueError as e:
        raise UserError(f"the post-hoc EMA profiles do not fit the run's model: {e}") from None
    return module, sum(1 for _, t, _ in profiles if t <= at)


def evaluate_widths(run: Any, profiles: Sequence[Profile], sigma_rels: Sequence[float],
                    at: int) -> list[dict[str, Any]]:
    """One posthoc.csv row per width (a progress line each); ``run``: a PosthocRun."""
    rows = []
    first = min(t for _, t, _ in profiles)
    for i, s in enumerate(sigma_rels, 1):
        t0 = time.perf_counter()
        module, n = reconstruct(run.model, profiles, s, at)
        metrics = run.evaluate(run.with_bn(module))
        rows.append({"kind": "posthoc_ema", "sigma_rel": s, "n_points": n, "first": first,
                     "last": at, **metrics})
        brief = " ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                         if k.startswith("val_") and v is not None)
        print(f"[{i}/{len(sigma_rels)}] post-hoc EMA sigma_rel={s:g} at step {at}: {n} saved "
              f"profiles | {brief} | {time.perf_counter() - t0:.1f}s", flush=True)
    return rows


def plot_widths(rows: Sequence[dict[str, Any]], reference: dict[str, float], path: Path,
                title: str) -> Path:
    """Validation loss against sigma_rel (the test loss where there is no validation split),
    the run's SGD and online SWA as horizontal lines."""
    pts = sorted((r["sigma_rel"], r.get("val_loss"), r.get("test_loss"))
                 for r in rows if r["kind"] == "posthoc_ema")
    use_val = all(v is not None for _, v, _ in pts)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[0] for p in pts], [p[1] if use_val else p[2] for p in pts], marker="o",
            label="post-hoc EMA")
    for label, value in reference.items():  # the run's own, on the same split
        if label.endswith("val loss" if use_val else "test loss"):
            ax.axhline(value, color="black" if label.startswith("SGD") else "tab:red",
                       linestyle="--", linewidth=1, label=f"{label} {value:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("sigma_rel (EMA width relative to the training time)")
    ax.set_ylabel("validation loss" if use_val else "test loss")
    ax.set_title(f"post-hoc EMA: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def reference_values(run_dir: Path, keys: Sequence[str]) -> dict[tuple[str, str], float]:
    """(label, key) -> the run's value in metrics.json of each of ``keys`` (e.g. val_loss) for
    its final SGD model and its online SWA, those present."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for name, label in (("sgd", "SGD (final)"), ("swa", "online SWA")):
        for key in keys:
            value = (metrics.get(name) or {}).get(key)
            if isinstance(value, (int, float)):
                out[label, key] = float(value)
    return out


def loss_reference(run_dir: Path) -> dict[str, float]:
    """The run's SGD and online SWA validation and test loss, labelled for the plot."""
    return {f"{label} {key.split('_')[0]} loss": v
            for (label, key), v in reference_values(run_dir, ("val_loss", "test_loss")).items()}


# -- the sweep report ---------------------------------------------------------------------------

def report_entries(runs: Sequence[Any]) -> list[str]:
    """Each finished run's post-hoc EMA rows (its posthoc.csv, written by ``python -m
    swa_research.posthoc --ema-sigma-rel``) put into its metrics, in memory, as averages named
    ``posthoc_ema_<sigma_rel>``: the sweep report then gives their columns and their gains over
    SGD paired by run like any average's. The names, by width."""
    names: dict[float, str] = {}
    for run in runs:
        path = Path(run.path) / "posthoc.csv"
        if not run.finished or run.metrics is None or not path.is_file():
            continue
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("kind") == "posthoc_ema"]
        except (OSError, csv.Error):
            continue
        for r in rows:
            try:
                s = float(r["sigma_rel"])
            except (KeyError, TypeError, ValueError):
                continue
            name = f"posthoc_ema_{s:g}"
            run.metrics[name] = {k: float(v) for k, v in r.items()
                                 if k.startswith(("val_", "test_")) and v not in ("", None)}
            names[s] = name
    return [names[s] for s in sorted(names)]


def plot_report(report: Any, path: Path) -> Path:
    """Validation loss against sigma_rel per configuration (mean over its runs), the
    configuration's SGD and online SWA validation loss as dashed and dotted lines of its
    color (EDM2's Figure 5 kind of plot, for a sweep)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    widths = sorted((float(n.removeprefix("posthoc_ema_")), n) for n in report.averages
                    if n.startswith("posthoc_ema_"))
    for i, row in enumerate(report.rows):
        color = colors[i % len(colors)]

        def mean(name: str, row: Any = row) -> float | None:
            values = [v for r in row.runs if (v := r.metric((name, "val_loss"))) is not None]
            return sum(values) / len(values) if values else None

        pts = [(s, m) for s, n in widths if (m := mean(n)) is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color,
                label=row.label)
        for name, style in (("sgd", "--"), ("swa", ":")):
            if (m := mean(name)) is not None:
                ax.axhline(m, color=color, linestyle=style, linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("sigma_rel (post-hoc EMA width relative to the training time)")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(f"post-hoc EMA ({report.root.name}); dashed: SGD, dotted: SWA", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
