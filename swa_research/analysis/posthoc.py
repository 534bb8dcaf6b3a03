"""Averages formed after training from a run's snapshots (``trainer.snapshot_every``):
``python -m swa_research.posthoc RUN_DIR [--swa-start A,B] [--swa-freq F] [--window W]
[--ema-decay D] [--ema-warmup] [--lawa-k K] [--device auto|cpu|cuda]``.

For every setting of the grid of the given lists (start, freq and window in the snapshot
index's unit: iterations for ``trainer.snapshot_unit=iter``, epochs for ``epoch``):

- ``swa``: the equal average of the snapshots at points p >= start, every freq-th unit from the
  first of them (p - p0) % freq == 0, the last ``window`` of those (0: all); the rule of
  ``swa.unit=epoch``, so start=S freq=F over epoch snapshots is the online SWA of
  ``swa.start=S swa.freq=F``.
- ``ema``: the exponential moving average of all snapshots with each ``--ema-decay``
  (``--ema-warmup``: decay_n = min(decay, 1 - (1 + n) ** (-2/3)), as ``swa.ema_warmup``).
- ``lawa``: LAWA (Kaddour et al., 2022), the equal average of the last k snapshots.

The weights are mixed by the functions the online averages use (``HostCountAveragedModel``), so
fp32 snapshots at the online points give the online average exactly. BN statistics are then
recomputed with one pass over the training data, the trainer's (same batches, augmentation,
batch size, seed and evaluation precision: ``Trainer.bn_batches`` at the run's last iteration),
and the average is evaluated on the validation and test sets (loss, accuracy; NLL and ECE on
the test set). Writes ``posthoc.csv`` (one row per setting) and ``posthoc.png`` (test accuracy
against start, a line per window and freq; the run's SGD and online SWA as horizontal lines) into
the run dir, atomically. On a multirun sweep dir, every run dir in it that has snapshots. A run
that logged to W&B gets the rows and plots in its own W&B record too (:mod:`.posthoc_wandb`;
``--no-wandb``: the local files only).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swa_research.analysis.posthoc_ema import (
    DEFAULT_SIGMA_RELS,
    check_request,
    evaluate_widths,
    loss_reference,
    plot_widths,
    profile_dtypes,
    read_profiles,
    reference_values,
)
from swa_research.analysis.posthoc_ema import PLOT_FILE as EMA_PLOT_FILE
from swa_research.analysis.posthoc_wandb import log_to_run
from swa_research.averaging import average_states, bn_update, has_batch_norm
from swa_research.averaging.power_ema import MAX_SIGMA_REL
from swa_research.config import Config, UserError, bn_batch_size, iterations_per_epoch
from swa_research.data import DataSplits, Preprocess
from swa_research.fileio import atomic_write_text, load_sharded_state
from swa_research.models import build_model, mismatch_detail
from swa_research.tasks import CLASSIFICATION, Task, TaskMetrics, build_task
from swa_research.tracking.plots import pyplot, save_figure
from swa_research.tracking.runs import find_run_dirs
from swa_research.training.build import load_run_config, prepare_device, resolve_device
from swa_research.training.evaluation import calibration_summary, collect_logits, evaluate
from swa_research.training.posthoc_ema import FOLDER as EMA_FOLDER
from swa_research.training.snapshots import INDEX, TRAJECTORY, read_index
from swa_research.training.step import autocast, memory_format, resolve_precision

log = logging.getLogger(__name__)

CSV_FILE = "posthoc.csv"
PLOT_FILE = "posthoc.png"
SETTING_COLUMNS = ["kind", "start", "freq", "window", "decay", "warmup", "k", "sigma_rel",
                   "n_points", "first", "last"]


def columns(task: Task) -> list[str]:
    """posthoc.csv's columns: the setting, the task's metrics on val and test, and the test
    set's NLL and ECE for a task that predicts class probabilities."""
    return [*SETTING_COLUMNS, *task.spec.keys(), *(["nll", "ece"] if task.probabilistic else [])]


COLUMNS = columns(build_task("classification"))
CACHE_BYTES = 2 << 30  # snapshots kept in memory between settings up to this much
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Setting:
    kind: str  # swa | ema | lawa
    start: int | None = None
    freq: int | None = None
    window: int | None = None
    decay: float | None = None
    warmup: bool | None = None
    k: int | None = None
    sigma_rel: float | None = None  # posthoc_ema: the reconstructed width

    def label(self) -> str:
        if self.kind == "posthoc_ema":
            return f"post-hoc EMA sigma_rel={self.sigma_rel:g}"
        if self.kind == "swa":
            return f"swa start={self.start} freq={self.freq} window={self.window}"
        if self.kind == "ema":
            return f"ema decay={self.decay:g}" + (" warmup" if self.warmup else "")
        return f"lawa k={self.k}"


def parse_list(text: str | None, flag: str, kind: type, low: float, high: float = math.inf,
               open_low: bool = False) -> list[Any]:
    """'A,B,C' -> [A, B, C] of ``kind`` within [low, high] (low excluded with open_low)."""
    if text is None:
        return []
    items = [t.strip() for t in text.split(",")]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise UserError(f"{flag}={text!r}: expected comma-separated {what}") from None
    for v in values:
        if not (v > low if open_low else v >= low) or not v <= high or not math.isfinite(v):
            bound = f"({low:g}, {high:g})" if math.isfinite(high) else (
                f"> {low:g}" if open_low else f">= {low:g}")
            raise UserError(f"{flag}={text!r}: {v:g} is out of range, expected {bound}")
    return list(dict.fromkeys(values))  # in order, without repeats


def point_of(entry: dict[str, Any], unit: str) -> int:
    """A snapshot's position in the index's unit."""
    return int(entry["epoch"] if unit == "epoch" else entry["iteration"])


def select(setting: Setting, entries: Sequence[dict[str, Any]], unit: str
           ) -> list[dict[str, Any]]:
    """The snapshots a setting averages, in order."""
    if setting.kind == "ema":
        return list(entries)
    if setting.kind == "lawa":
        return list(entries[-(setting.k or 1):])
    chosen = [e for e in entries if point_of(e, unit) >= (setting.start or 0)]
    if not chosen:
        return []
    p0 = point_of(chosen[0], unit)
    chosen = [e for e in chosen if (point_of(e, unit) - p0) % (setting.freq or 1) == 0]
    return chosen[-setting.window:] if setting.window else chosen


DEFAULT_STARTS = (0.0, 0.25, 0.5, 0.75)  # fractions of the trajectory
DEFAULT_LAWA_K = (2, 4, 8)
DEFAULT_EMA_HORIZONS = (0.125, 0.25)  # an EMA's 1 / (1 - decay), as a fraction of the snapshots


def default_grid(points: Sequence[int], every: int, warmup: bool) -> list[Setting]:
    """The grid evaluated when no flag is given: the equal average from the snapshots nearest
    to 0, 1/4, 1/2 and 3/4 of the trajectory, LAWA over the last 2, 4 and 8 snapshots, and EMAs
    whose horizon 1 / (1 - decay) is an eighth and a quarter of the snapshots (at least 2);
    each only where the trajectory holds enough snapshots, without repeats."""
    n = len(points)
    starts = list(dict.fromkeys(points[min(n - 1, int(f * n))] for f in DEFAULT_STARTS))
    settings = [Setting("swa", start=p, freq=every, window=0) for p in starts]
    decays = dict.fromkeys(round(1 - 1 / max(2.0, h * n), 4) for h in DEFAULT_EMA_HORIZONS)
    settings += [Setting("ema", decay=d, warmup=warmup) for d in decays]
    settings += [Setting("lawa", k=k) for k in DEFAULT_LAWA_K if k < n]
    return settings


def build_settings(args: argparse.Namespace, index: dict[str, Any]) -> list[Setting]:
    """The grid of the command line's lists, checked against the snapshots (a UserError
    names the flag)."""
    entries, unit, every = index["snapshots"], index["unit"], int(index["every"])
    points = [point_of(e, unit) for e in entries]
    flags = (args.swa_start, args.swa_freq, args.window, args.ema_decay, args.lawa_k)
    if all(f is None for f in flags):
        return default_grid(points, every, bool(args.ema_warmup))
    starts = parse_list(args.swa_start, "--swa-start", int, 0) or [points[0]]
    freqs = parse_list(args.swa_freq, "--swa-freq", int, 1) or [every]
    windows = parse_list(args.window, "--window", int, 0) or [0]
    decays = parse_list(args.ema_decay, "--ema-decay", float, 0.0, 1.0, open_low=True)
    ks = parse_list(args.lawa_k, "--lawa-k", int, 1)
    for f in freqs:
        if f % every:
            raise UserError(f"--swa-freq={f}: must be a multiple of the snapshot interval "
                            f"({every} {unit})")
    for s in starts:
        if s > points[-1]:
            raise UserError(f"--swa-start={s}: no snapshot at or after {unit} {s} (the last "
                            f"is at {unit} {points[-1]})")
    for d in decays:
        if d >= 1.0:
            raise UserError(f"--ema-decay={d:g}: must be in (0, 1)")
    for k in ks:
        if k > len(entries):
            raise UserError(f"--lawa-k={k}: the run has only {len(entries)} snapshots")
    settings = [Setting("swa", start=s, freq=f, window=w)
                for s, f, w in itertools.product(starts, freqs, windows)]
    settings += [Setting("ema", decay=d, warmup=args.ema_warmup) for d in decays]
    settings += [Setting("lawa", k=k) for k in ks]
    return settings


class PosthocRun:
    """A run's config, data and model rebuilt as the trainer built them, its snapshots, and
    the evaluation of an average of them."""

    def __init__(self, run_dir: Path, device: torch.device, snapshots: bool = True) -> None:
        self.run_dir = run_dir
        # snapshots=False: the run rebuilt without its trajectory (python -m
        # swa_research.ensemble combines runs' saved weights).
        self.index = read_index(run_dir) if snapshots else {"snapshots": [], "unit": "iter"}
        self.config: Config = load_run_config(run_dir)
        cfg = self.config
        self.device = device
        prepare_device(device, cfg.trainer.deterministic)
        self.task = build_task(cfg.task.name)
        fmt = memory_format(cfg.trainer.channels_last)
        self.data: DataSplits = self.task.build_data(cfg, device, cfg.trainer.num_workers, fmt)
        self.model: nn.Module = build_model(cfg.model, self.task.output_size(self.data),
                                            self.data.image_size).to(device, memory_format=fmt)
        dc = cfg.data
        self.train_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, augment=dc.augment,
                                    memory_format=fmt)
        self.eval_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, memory_format=fmt)
        self.precision = resolve_precision(cfg.trainer.eval_precision, device)
        t = cfg.trainer
        # The trainer's last evaluation, whose BN batches are seeded by the final iteration.
        self.final_iteration = t.max_steps or t.epochs * iterations_per_epoch(
            len(self.data.train), t.batch_size, t.drop_last)
        self.bn = cfg.swa.bn_update and has_batch_norm(self.model)
        self._cache: dict[str, State] = {}
        self._cached_bytes = 0

    def snapshot(self, entry: dict[str, Any]) -> State:
        name = entry["file"]
        if name in self._cache:
            return self._cache[name]
        path = self.run_dir / TRAJECTORY / name
        try:
            if path.is_dir():  # a sharded snapshot (trainer.strategy=fsdp), read whole
                state = load_sharded_state(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        except FileNotFoundError:
            raise UserError(f"{path} is listed in {TRAJECTORY}/{INDEX} but missing") from None
        except Exception as e:
            raise UserError(f"{path} cannot be read ({type(e).__name__})") from e
        size = sum(v.numel() * v.element_size() for v in state.values())
        if self._cached_bytes + size <= CACHE_BYTES:
            self._cache[name] = state
            self._cached_bytes += size
        return state

    def average(self, setting: Setting, entries: Sequence[dict[str, Any]]) -> nn.Module:
        """The averaged network of ``entries`` (BN statistics recomputed)."""
        current: list[dict[str, Any]] = []

        def states() -> Iterator[State]:
            for entry in entries:
                current[:] = [entry]
                yield self.snapshot(entry)

        try:  # the library's post-hoc average: the online averages' arithmetic
            module = average_states(self.model, states(),
                                    kind="ema" if setting.kind == "ema" else "swa",
                                    decay=setting.decay or 0.0, warmup=bool(setting.warmup))
        except (RuntimeError, KeyError, ValueError) as e:
            detail = mismatch_detail(e).split("does not fit the model: ", 1)[-1]
            raise UserError(f"{self.run_dir / TRAJECTORY / current[0]['file']} does not fit "
                            f"the model of {self.run_dir}/.hydra/config.yaml (snapshots of "
                            f"another run?): {detail}") from None
        return self.with_bn(module)

    def with_bn(self, module: nn.Module) -> nn.Module:
        """``module`` with BN statistics recomputed as the trainer's final BN pass does."""
        if self.bn:
            with autocast(self.precision, self.device), torch.random.fork_rng(
                    devices=[self.device.index or 0] if self.device.type == "cuda" else []):
                torch.manual_seed(self.config.seed)  # dropout in the BN pass, if any
                bn_update(self.bn_batches(), module)
        return module

    def bn_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``Trainer.bn_batches`` at the run's final evaluation."""
        return self.task.bn_batches(self.data.train, bn_batch_size(self.config),
                                    self.config.seed, self.final_iteration, self.train_pre)

    def evaluate(self, module: nn.Module) -> dict[str, float | None]:
        bs = self.config.trainer.eval_batch_size
        with autocast(self.precision, self.device):
            out = {f"{split}_{m}": v for split in ("val", "test")
                   for m, v in evaluate(module, getattr(self.data, split), self.eval_pre, bs,
                                        self.task).items()}
            if not self.task.probabilistic:
                return out
            logits, labels = collect_logits(module, self.data.test, self.eval_pre, bs)
        cal, _ = calibration_summary(logits, labels)
        return {**out, "nll": cal["nll"], "ece": cal["ece"]}


def evaluate_settings(run: PosthocRun, settings: Sequence[Setting]) -> list[dict[str, Any]]:
    """One row per setting; a progress line for each."""
    entries, unit = run.index["snapshots"], run.index["unit"]
    rows = []
    for i, setting in enumerate(settings, 1):
        t0 = time.perf_counter()
        chosen = select(setting, entries, unit)
        metrics = run.evaluate(run.average(setting, chosen))
        spec = run.task.spec
        row = {"kind": setting.kind, "start": setting.start, "freq": setting.freq,
               "window": setting.window, "decay": setting.decay,
               "warmup": None if setting.warmup is None else int(setting.warmup),
               "k": setting.k, "n_points": len(chosen),
               "first": point_of(chosen[0], unit), "last": point_of(chosen[-1], unit),
               **metrics}
        rows.append(row)
        print(f"[{i}/{len(settings)}] {setting.label()}: {len(chosen)} snapshots ({unit} "
              f"{row['first']}..{row['last']}) | {_brief(row, spec)} | "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    return rows


def _brief(row: dict[str, Any], spec: TaskMetrics) -> str:
    def scores(split: str) -> str:
        if row[f"{split}_loss"] is None:
            return "-"
        return " ".join(spec.show(m, row[f"{split}_{m}"]) for m in spec.metrics)

    text = f"val {scores('val')} test {scores('test')}"
    if row.get("nll") is not None:
        text += f" nll {row['nll']:.4f} ece {100 * row['ece']:.2f}%"
    return text


def write_csv(path: Path, rows: Sequence[dict[str, Any]], task: Task) -> Path:
    cols = columns(task)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in cols})
    atomic_write_text(path, buf.getvalue())
    return path


def run_reference(run_dir: Path, spec: TaskMetrics) -> dict[str, float]:
    """The run's SGD and online SWA test headline metric (accuracy for classification) from
    metrics.json (those present)."""
    key = f"test_{spec.headline}"
    return {label: v for (label, _), v in reference_values(run_dir, (key,)).items()}


def plot(rows: Sequence[dict[str, Any]], reference: dict[str, float], unit: str, path: Path,
         title: str, spec: TaskMetrics) -> Path:
    """The test headline metric (accuracy in % for classification) of each equal average
    against its start, the EMA and LAWA settings and the run's own results as lines."""
    m = spec.headline
    scale, sign = (100.0, "%") if m in spec.percent else (1.0, "")
    key = f"test_{m}"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    swa = [r for r in rows if r["kind"] == "swa"]
    lines = sorted({(r["freq"], r["window"]) for r in swa})
    for freq, window in lines:
        pts = sorted((r["start"], scale * r[key]) for r in swa
                     if (r["freq"], r["window"]) == (freq, window))
        label = f"window {window or 'all'}" + (f", freq {freq}" if len(
            {f for f, _ in lines}) > 1 else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    styles = iter(["-", "--", ":", "-."] * 4)
    for label, acc in reference.items():
        ax.axhline(scale * acc, color="black" if label.startswith("SGD") else "tab:red",
                   linestyle=next(styles), linewidth=1,
                   label=f"{label} {spec.show(m, acc)}")
    for r in [r for r in rows if r["kind"] != "swa"][:8]:
        name = (f"EMA {r['decay']:g}" + (" warmup" if r["warmup"] else "")
                if r["kind"] == "ema" else f"LAWA k={r['k']}")
        ax.axhline(scale * r[key], color="tab:gray", linestyle=next(styles),
                   linewidth=1, label=f"{name} {spec.show(m, r[key])}")
    ax.set_xlabel(f"start of the equal average ({unit})")
    ax.set_ylabel(f"test {spec.title(m)}" + (f" ({sign})" if sign else ""))
    ax.set_title(f"post-hoc averages: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def best_row(rows: Sequence[dict[str, Any]], spec: TaskMetrics = CLASSIFICATION
             ) -> tuple[dict[str, Any], str]:
    """The best setting by the validation headline metric (accuracy for classification; then
    the loss), or by the test one when the run has no validation split."""
    m = spec.headline
    sign = 1.0 if m in spec.maximize else -1.0
    if all(r[f"val_{m}"] is not None for r in rows):
        return (max(rows, key=lambda r: (sign * r[f"val_{m}"], -r["val_loss"])),
                f"validation {spec.title(m)}")
    return (max(rows, key=lambda r: sign * r[f"test_{m}"]),
            f"test {spec.title(m)} (no validation split)")


def describe(row: dict[str, Any], spec: TaskMetrics = CLASSIFICATION) -> str:
    s = Setting(row["kind"], row.get("start"), row.get("freq"), row.get("window"),
                row.get("decay"), None if row.get("warmup") is None else bool(row["warmup"]),
                row.get("k"), row.get("sigma_rel"))
    return f"{s.label()} (n={row['n_points']}): {_brief(row, spec)}"


def posthoc_run(run_dir: Path, args: argparse.Namespace, device: torch.device
                ) -> tuple[list[dict[str, Any]], TaskMetrics]:
    """Every setting of ``args`` on one run dir: the snapshot grid (unless only post-hoc EMA
    widths were asked for) and the post-hoc EMA widths (``--ema-sigma-rel``); writes its CSV and
    plots. The rows and the run's task metrics."""
    widths = ema_widths(args)
    has_snapshots = (run_dir / TRAJECTORY / INDEX).is_file()
    grid = has_snapshots and (widths is None or snapshot_flags(args))
    if not grid and widths is None:
        read_index(run_dir)  # raises its one line: no snapshots
    profiles = read_profiles(run_dir) if widths is not None else []
    at = check_request(profiles, widths, args.at, run_dir) if widths is not None else None
    index = read_index(run_dir) if grid else {"snapshots": [], "unit": "iter"}
    settings = build_settings(args, index) if grid else []
    run = PosthocRun(run_dir, device, snapshots=grid)
    rows: list[dict[str, Any]] = []
    if grid:
        n = len(index["snapshots"])
        print(f"{run_dir}: {len(settings)} setting(s) over {n} snapshots (every "
              f"{index['every']} {index['unit']}, {index['dtype']}) on {device}; BN statistics "
              f"{'recomputed' if run.bn else 'none (no BN layers or swa.bn_update=false)'}",
              flush=True)
        if index["dtype"] != "fp32":
            print(f"note: the snapshots are {index['dtype']}: their averages approximate the "
                  "online ones (each weight rounded to 8 mantissa bits; 2.9e-3 measured on the "
                  "smoke run), they do not equal them", flush=True)
        rows = evaluate_settings(run, settings)
    if widths is not None and at is not None:
        print(f"{run_dir}: post-hoc EMA of {len(widths)} width(s) at step {at} from "
              f"{len(profiles)} saved profiles on {device}", flush=True)
        if profile_dtypes(run_dir) - {"fp32"}:
            print("note: the profiles were saved in bf16: the reconstruction approximates the "
                  "EMA (measured with 20 saves: 2.5e-2 of its distance from the final weights "
                  "at sigma_rel 0.07, against 3.4e-4 from fp32 profiles; docs/posthoc.md)",
                  flush=True)
        ema_rows = evaluate_widths(run, profiles, widths, at)
        rows += ema_rows
        plot_widths(ema_rows, loss_reference(run_dir), run_dir / EMA_PLOT_FILE,
                    run_dir.resolve().name)
    write_csv(run_dir / CSV_FILE, rows, run.task)
    if grid:
        plot(rows, run_reference(run_dir, run.task.spec), index["unit"], run_dir / PLOT_FILE,
             run_dir.resolve().name, run.task.spec)
    return rows, run.task.spec


def ema_widths(args: argparse.Namespace) -> list[float] | None:
    """--ema-sigma-rel's widths (its default grid without values); None when not given."""
    if args.ema_sigma_rel is None:
        return None
    if args.ema_sigma_rel == "default":
        return list(DEFAULT_SIGMA_RELS)
    return parse_list(args.ema_sigma_rel, "--ema-sigma-rel", float, 0.0, MAX_SIGMA_REL,
                      open_low=True)


def snapshot_flags(args: argparse.Namespace) -> bool:
    return any(f is not None for f in (args.swa_start, args.swa_freq, args.window,
                                       args.ema_decay, args.lawa_k))


def target_dirs(path: Path) -> list[Path]:
    """The run dir itself, or the run dirs with snapshots in a sweep dir."""
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    if (path / TRAJECTORY / INDEX).is_file() or (path / ".hydra" / "config.yaml").is_file():
        return [path]
    runs = [d for d in find_run_dirs([path])
            if (d / TRAJECTORY / INDEX).is_file() or (d / EMA_FOLDER).is_dir()]
    if not runs:
        raise UserError(f"{path} holds no run with snapshots ({TRAJECTORY}/{INDEX}) or post-hoc "
                        f"EMA profiles ({EMA_FOLDER}/); train with trainer.snapshot_every=N or "
                        "trainer.posthoc_ema=[0.05,0.10] to record them")
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swa_research.posthoc",
        description="Equal (SWA), EMA and LAWA averages of a run's weight snapshots "
                    "(trainer.snapshot_every), each with fresh BN statistics, evaluated on "
                    "the validation and test sets; posthoc.csv and posthoc.png in the run dir.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run dir, or a multirun sweep dir")
    parser.add_argument("--swa-start", metavar="A,B,..",
                        help="starts of the equal average, in the snapshots' unit (default: "
                             "the first snapshot)")
    parser.add_argument("--swa-freq", metavar="F,..",
                        help="take every F-th unit from the start (default: every snapshot)")
    parser.add_argument("--window", metavar="W,..",
                        help="only the last W of the chosen snapshots (default 0: all)")
    parser.add_argument("--ema-decay", metavar="D,..", help="EMA over all snapshots")
    parser.add_argument("--ema-warmup", action="store_true",
                        help="EMA decay min(D, 1 - (1 + n) ** (-2/3)) (swa.ema_warmup)")
    parser.add_argument("--lawa-k", metavar="K,..", help="LAWA: the mean of the last K")
    parser.add_argument("--ema-sigma-rel", metavar="S,..", nargs="?", const="default",
                        help="post-hoc EMA (trainer.posthoc_ema): reconstruct the power EMA of "
                             "these relative widths (without values: 0.01..0.25)")
    parser.add_argument("--at", metavar="STEP", type=int,
                        help="the step to reconstruct the post-hoc EMA at (default: the last "
                             "saved)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log the results into the run's own W&B record (logged "
                             "there by default when the run logged to W&B)")
    args = parser.parse_args(argv)
    try:
        if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
            raise UserError(f"--device {args.device}: expected auto, cpu or cuda")
        device = resolve_device(args.device, key="--device ")
        runs = target_dirs(Path(args.run_dir))
        if len(runs) == 1:
            # Check the lists before loading anything: a typo costs no data loading.
            widths = ema_widths(args)
            if widths is None or snapshot_flags(args):
                build_settings(args, read_index(runs[0]))
            if widths is not None:
                check_request(read_profiles(runs[0]), widths, args.at, runs[0])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    best: list[str] = []
    for run_dir in runs:
        try:
            rows, spec = posthoc_run(run_dir, args, device)
        except UserError as e:
            print(f"error: {run_dir}: {e}" if len(runs) > 1 else f"error: {e}",
                  file=sys.stderr)
            failed += 1
            continue
        row, by = best_row(rows, spec)
        best.append(f"{run_dir}: best by {by}: {describe(row, spec)}")
        kinds = {r["kind"] == "posthoc_ema" for r in rows}  # (this call's plots)
        plots = [f for f, drawn in ((PLOT_FILE, False in kinds), (EMA_PLOT_FILE, True in kinds))
                 if drawn and (run_dir / f).is_file()]
        print(f"wrote {run_dir / CSV_FILE} and {', '.join(plots)}", flush=True)
        where = None if args.no_wandb else log_to_run(run_dir, rows,
                                                      [run_dir / f for f in plots], spec)
        if where:
            print(f"logged to the run's W&B record: {where}", flush=True)
    for line in best:
        print(line)
    return 2 if failed else 0

