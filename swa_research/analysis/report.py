"""Sweep report: ``python -m swa_research.report PATH [PATH ...] [--no-wandb]``.

PATH is a sweep dir, run dirs, or a folder above them; run dirs are found recursively by their
``metrics.json`` or ``.hydra/overrides.yaml``. A configuration is the set of overrides that
differ between the runs, leaving out ``seed`` and ``hydra.*``; per configuration the report
gives mean and sample standard deviation over seeds of the final SGD, best-validation SGD and
SWA test accuracy and loss (and calibration when the runs have it), the SWA gain (SWA minus
final SGD test accuracy, paired by run) with a 95% t interval over seeds, and the number of
runs. Failed runs (status other than "finished", or no metrics.json) are listed and never
averaged. Writes report.md, report.csv and PNG plots atomically, and logs the table to W&B
when the runs used it. A multirun of ``swa_research.train`` ends with this report for its
sweep dir.

When finished runs measure cells of the SWA paper's Table 1 (``swa_research.analysis.paper``: a run
of one of its recipes, e.g. ``experiment=paper/preresnet164_cifar100_swa1.5``), the report also
gives, per cell, the published mean ± std against the measured mean ± std over seeds, n, the
difference, and whether the measured mean lies within the published mean ± 1 std or ± 2 std
(a "paper vs measured" table, also in report_paper.csv). Runs of a paper preset with changed
settings (fewer epochs, generated data, ...) appear there too, in rows of their own marked with
what differs (the recipe column; never pooled with the paper's recipe, no verdict): their
numbers are not comparable with the published ones. Without such runs nothing changes.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swa_research.analysis.paper import (
    COMPARISON_HEADER,
    CSV_HEADER,
    OTHER_RECIPE_NOTE,
    Comparison,
    classify,
    compare,
    comparison_cells,
    comparison_csv_row,
    measured_cells,
    recipe_differences,
)
from swa_research.analysis.posthoc_ema import plot_report as plot_posthoc_ema
from swa_research.analysis.posthoc_ema import report_entries
from swa_research.analysis.report_plots import plot_accuracy, plot_gain
from swa_research.analysis.report_wandb import log_to_wandb
from swa_research.analysis.runset import Run, differing_keys, load_run, show
from swa_research.analysis.stats import PairedCI, Stat
from swa_research.analysis.tables import format_combined, md_table, read_combined
from swa_research.config import UserError
from swa_research.fileio import atomic_write_text
from swa_research.tasks import CLASSIFICATION, TaskMetrics
from swa_research.tracking.plots import read_history
from swa_research.tracking.runs import find_run_dirs, is_run_dir

log = logging.getLogger(__name__)

def curves_file(spec: TaskMetrics) -> str:
    """The file of the headline metric's curves: ``report_accuracy.png`` for classification,
    ``report_loss.png`` for a language model, ``report_<metric>.png`` otherwise."""
    return f"report_{'accuracy' if spec.headline == 'acc' else spec.headline}.png"


def percent_note(spec: TaskMetrics, columns: Sequence[Metric]) -> str:
    """``; acc and ECE in %``: which of the table's values are percentages (none: empty)."""
    shown = sorted(spec.percent) + (["ECE"] if any(c[0].endswith("_ece") for c in columns)
                                    else [])
    return f"; {' and '.join(shown)} in %" if shown else ""
POSTHOC_EMA_PLOT = "report_posthoc_ema.png"  # runs with post-hoc EMA rows
PAPER_CSV = "report_paper.csv"  # only when runs measure cells of the SWA paper's table
Metric = tuple[str, tuple[str, ...], str]  # (column, path in metrics.json, label)


def _label(spec: TaskMetrics, m: str) -> str:
    return f"{m} %" if m in spec.percent else m


def metric_columns(averages: Sequence[str] = (), spec: TaskMetrics = CLASSIFICATION,
                   calibrated: bool = True) -> list[Metric]:
    """The report's columns for the runs' task: the final SGD, best-val SGD and SWA test
    values of the headline metric (accuracy for classification), then of the other metrics,
    the calibration (``calibrated``: the runs' metrics.json hold one; a language model's do
    not), then the same per further average (``swa.also``) by name."""
    ordered = [spec.headline, *(m for m in spec.metrics if m != spec.headline)]
    out: list[Metric] = []
    for m in ordered:
        out += [(f"sgd_test_{m}", ("sgd", f"test_{m}"), f"SGD final {_label(spec, m)}"),
                (f"sgd_best_val_test_{m}", ("sgd_best_val", f"test_{m}"),
                 f"SGD best-val {_label(spec, m)}"),
                (f"swa_test_{m}", ("swa", f"test_{m}"), f"SWA {_label(spec, m)}")]
    if calibrated:
        out += [("sgd_ece", ("calibration", "sgd", "ece"), "SGD ECE %"),
                ("swa_ece", ("calibration", "swa", "ece"), "SWA ECE %"),
                ("sgd_nll", ("calibration", "sgd", "nll"), "SGD NLL"),
                ("swa_nll", ("calibration", "swa", "nll"), "SWA NLL")]
    for name in averages:
        if name != "swa":
            label = name.upper()
            out += [(f"{name}_test_{m}", (name, f"test_{m}"), f"{label} {_label(spec, m)}")
                    for m in ordered]
            if calibrated:
                out += [(f"{name}_ece", ("calibration", name, "ece"), f"{label} ECE %"),
                        (f"{name}_nll", ("calibration", name, "nll"), f"{label} NLL")]
    return out


# The columns of a classification sweep without further averages.
METRICS: tuple[Metric, ...] = tuple(metric_columns())


def is_percent(column: str) -> bool:
    return column.endswith(("_acc", "_ece"))


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class ConfigRow:
    label: str
    values: dict[str, Any]  # differing key -> value
    runs: list[Run] = field(default_factory=list)  # finished runs only
    failed: list[Run] = field(default_factory=list)
    stats: dict[str, Stat] = field(default_factory=dict)
    gain: PairedCI = field(default_factory=PairedCI)
    # Each further average's (swa.also: EMA, FGE, ...) gain over SGD, paired by run as SWA's.
    gains: dict[str, PairedCI] = field(default_factory=dict)

    def summarise(self, columns: Sequence[Metric] = METRICS,
                  spec: TaskMetrics = CLASSIFICATION, averages: Sequence[str] = ()) -> None:
        for column, path, _ in columns:
            self.stats[column] = Stat.of([v for r in self.runs
                                          if (v := r.metric(path)) is not None])
        self.gain = self.paired_gain("swa", spec)
        self.gains = {n: self.paired_gain(n, spec) for n in averages if n != "swa"}

    def paired_gain(self, name: str, spec: TaskMetrics) -> PairedCI:
        """The average ``name``'s gain over the final SGD model, run by run: mean and 95% t
        interval over the seeds."""
        diffs = []
        key = f"test_{spec.headline}"
        for r in self.runs:
            sgd, avg = r.metric(("sgd", key)), r.metric((name, key))
            if sgd is not None and avg is not None:
                diffs.append(spec.gain(sgd, avg))
        return PairedCI.of(diffs)


@dataclass
class Report:
    root: Path
    keys: list[str]
    rows: list[ConfigRow]
    runs: list[Run]
    table: str = ""
    markdown: str = ""
    files: list[Path] = field(default_factory=list)
    wandb_run: str | None = None  # the W&B run's path or offline folder, when logged
    columns: list[Metric] = field(default_factory=lambda: list(METRICS))
    spec: TaskMetrics = CLASSIFICATION  # the runs' task: its metric names
    # The SWA paper's cells these runs measure (swa_research.analysis.paper; runs of another recipe
    # in rows of their own), and the finished runs of its models, data sets or presets that
    # measure no cell (with what differs from the paper's recipe, empty when nothing does).
    paper: list[Comparison] = field(default_factory=list)
    paper_skipped: list[tuple[Run, list[tuple[str, Any, Any]]]] = field(default_factory=list)
    averages: list[str] = field(default_factory=list)  # the further averages, by name
    # python -m swa_research.ensemble's ensemble.csv in the report's folder: the final deep
    # ensemble, uniform soup and greedy soup of each kind of weights.
    combined: list[dict[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> list[Run]:
        return [r for r in self.runs if not r.finished]

    def further_columns(self) -> list[Metric]:
        """The columns of the averages besides the primary (``swa.also``)."""
        further = set(self.averages)
        return [c for c in self.columns
                if c[1][0] in further or (c[1][0] == "calibration" and c[1][1] in further)]

    def text(self) -> str:
        """The table, and the failed runs one per line: what the commands print (and the
        paper-vs-measured table when runs measure the paper's cells)."""
        lines = [self.table]
        if self.combined:
            lines += ["", "ensembles and soups of the runs (ensemble.csv):",
                      format_combined(self.combined)]
        if self.paper:
            lines += ["", "paper vs measured (SWA paper, Table 1; test accuracy %):",
                      format_paper_table(self)]
            if any(c.recipe != "paper" for c in self.paper):
                lines.append(OTHER_RECIPE_NOTE)
        if self.failed:
            lines.append(f"failed runs ({len(self.failed)}, not averaged):")
            for r in self.failed:
                why = f" ({r.error.splitlines()[0][:160]})" if r.error else ""
                lines.append(f"  {r.name}: {r.status}{why}")
        return "\n".join(lines)

    def csv_rows(self) -> tuple[list[str], list[list[Any]]]:
        columns = ["configuration", *self.keys, "n_runs", "n_failed", "seeds"]
        for column, _, _ in self.columns:
            columns += [f"{column}_mean", f"{column}_std"]
        for name in ("swa", *self.averages):
            columns += [f"{name}_gain_{k}" for k in ("mean", "std", "ci95_low", "ci95_high",
                                                     "n")]
        data = []
        for row in self.rows:
            line: list[Any] = [row.label, *(show(row.values[k]) for k in self.keys),
                               len(row.runs), len(row.failed),
                               " ".join(show(r.seed) for r in row.runs)]
            for column, _, _ in self.columns:
                line += [row.stats[column].mean, row.stats[column].std]
            for g in (row.gain, *(row.gains.get(n, PairedCI()) for n in self.averages)):
                line += [g.mean, g.std, g.low, g.high, g.n]
            data.append(line)
        return columns, data


def build_report(paths: Sequence[str | Path], root: str | Path | None = None) -> Report:
    """Find and group the runs under ``paths``; nothing is written."""
    root = Path(root if root is not None else paths[0]).resolve()
    runs = [load_run(d, root) for d in find_run_dirs(paths)]
    if not runs:
        raise FileNotFoundError(
            f"no run dirs (with metrics.json or .hydra/overrides.yaml) under "
            f"{', '.join(str(p) for p in paths)}")
    keys = differing_keys(runs)
    averages: list[str] = []
    for run in runs:
        averages += [n for n in (run.metrics or {}).get("averages") or [] if n not in averages]
    averages += report_entries(runs)  # post-hoc EMA widths of the runs' posthoc.csv
    spec = runs_task(runs)
    calibrated = any((run.metrics or {}).get("calibration") for run in runs)
    columns = metric_columns(averages, spec, calibrated)
    rows: dict[str, ConfigRow] = {}
    for run in runs:
        values = {k: run.value(k) for k in keys}
        # A run that averages nothing has no averaging settings: its label omits them (the
        # paper's SGD baseline is not "swa.start=161").
        shown = {k: v for k, v in values.items()
                 if not (k.startswith("swa.") and k != "swa.method"
                         and run.value("swa.method") == "none")}
        label = ", ".join(f"{k}={show(v)}" for k, v in shown.items()) or "all runs"
        row = rows.setdefault(label, ConfigRow(label, values))
        (row.runs if run.finished else row.failed).append(run)
    for row in rows.values():
        row.summarise(columns, spec, averages)
    report = Report(root=root, keys=keys, rows=list(rows.values()), runs=runs, columns=columns,
                    spec=spec, averages=[n for n in averages if n != "swa"],
                    combined=read_combined(root))
    report.paper, report.paper_skipped = paper_comparison(runs)
    report.table = format_table(report)
    report.markdown = format_markdown(report)
    return report


def runs_task(runs: Sequence[Run]) -> TaskMetrics:
    """The task of the runs (metrics.json's ``task``); runs of several tasks are refused."""
    specs = {TaskMetrics.of_run(r.metrics) for r in runs if r.metrics and "sgd" in r.metrics}
    if len(specs) > 1:
        raise UserError("the runs are of different tasks ("
                        f"{', '.join(sorted(s.name for s in specs))}): report each apart")
    return specs.pop() if specs else CLASSIFICATION


def _history_rows(run: Run) -> list[dict[str, float | None]]:
    try:
        return read_history(run.path / "history.csv")
    except (OSError, ValueError):
        return []


def paper_comparison(runs: Sequence[Run]
                     ) -> tuple[list[Comparison], list[tuple[Run, list[tuple[str, Any, Any]]]]]:
    """The paper's cells the finished runs measure, compared with the published figures: the
    runs of the paper's recipe, and in rows of their own those of another recipe (a paper
    model and data set, or a paper preset, with settings changed); and, when there are any,
    the finished runs of the paper's models, data sets or presets that measure no cell (with
    their differences from the paper's recipe)."""
    measurements = []
    skipped = []
    for run in runs:
        experiment = run.value("experiment")
        if not run.finished or classify(run.config, experiment) is None:
            continue
        cells = measured_cells(run.config, run.metrics or {}, _history_rows(run),
                               experiment=experiment, other_recipes=True)
        if not cells:
            skipped.append((run, recipe_differences(run.config, experiment)))
        measurements += cells
    cells = compare(measurements)
    return cells, skipped if cells else []


def format_paper_table(report: Report) -> str:
    return md_table(COMPARISON_HEADER, [comparison_cells(c) for c in report.paper])


def format_paper_section(report: Report) -> list[str]:
    """The "paper vs measured" section of report.md (empty without paper cells)."""
    if not report.paper:
        return []
    parts = ["## Paper vs measured", "",
             "The SWA paper's Table 1 (timgaripov/swa README.md; mean ± std over 3 runs) against "
             "these runs (mean ± sample std over seeds, n runs). SGD: the final SGD model of a "
             "run without averaging over the budget; SWA 1, 1.25, 1.5 budgets: the average of a "
             "SWA run at that epoch (history.csv). Difference: measured minus published mean "
             "in percentage points. Within published: the measured mean lies within the "
             "published mean ± 1 std (\"1 std\"), else within ± 2 std (\"2 std\"), else "
             "\"no\"; given for the paper's recipe only. Recipe: \"paper\", or what the runs "
             "change (the first three differences; report_paper.csv has them all).", "",
             format_paper_table(report), ""]
    if any(c.recipe != "paper" for c in report.paper):
        parts += [OTHER_RECIPE_NOTE[0].upper() + OTHER_RECIPE_NOTE[1:], ""]
    if report.paper_skipped:
        parts += ["Not compared (a paper model and data set, or a paper preset, that measures "
                  "no cell: no evaluation of the average at the epochs read):", ""]
        for run, diffs in report.paper_skipped:
            what = ", ".join(f"{k}={show(have)} (paper: {show(want)})"
                             for k, have, want in diffs[:4])
            more = f", and {len(diffs) - 4} more" if len(diffs) > 4 else ""
            parts.append(f"- {run.name}: {what + more if what else 'the paper recipe'}")
        parts.append("")
    return parts


def _fmt(stat: Stat, column: str) -> str:
    if stat.mean is None:
        return "-"
    scale, digits = (100.0, 2) if is_percent(column) else (1.0, 4)
    text = f"{scale * stat.mean:.{digits}f}"
    return text if stat.std is None else f"{text} ± {scale * stat.std:.{digits}f}"


def _fmt_gain(g: PairedCI, spec: TaskMetrics = CLASSIFICATION) -> str:
    if g.mean is None:
        return "-"
    scale, _ = spec.gain_scale()
    digits = 2 if scale == 100.0 else 4
    text = f"{scale * g.mean:+.{digits}f}"
    if g.low is None or g.high is None:
        return f"{text} (n={g.n}, no interval)"
    return f"{text} [{scale * g.low:+.{digits}f}, {scale * g.high:+.{digits}f}]"


def format_table(report: Report) -> str:
    spec, h = report.spec, report.spec.headline
    extra = [c for c, _, _ in report.further_columns() if c.endswith(f"_test_{h}")]
    shown = (f"sgd_test_{h}", f"sgd_best_val_test_{h}", f"swa_test_{h}")
    losses = tuple(c for m in spec.metrics if m != h
                   for c in (f"sgd_test_{m}", f"sgd_best_val_test_{m}", f"swa_test_{m}"))
    calib = [c for c, _, _ in report.columns
             if c.endswith("_ece") and any(r.stats[c].n for r in report.rows)]
    labels = {c: lbl for c, _, lbl in report.columns}
    unit = spec.gain_scale()[1]
    header = ["configuration", "n", *(labels[c] for c in shown),
              f"SWA gain{unit} [95% CI]",
              *(x for c in extra for x in (labels[c], f"{c.split('_test_')[0].upper()} "
                                                      f"gain{unit} [95% CI]")),
              *(labels[c] for c in (*losses, *calib)), "failed"]
    rows = [[r.label, str(len(r.runs)), *(_fmt(r.stats[c], c) for c in shown),
             _fmt_gain(r.gain, spec),
             *(x for c in extra for x in (_fmt(r.stats[c], c), _fmt_gain(
                 r.gains.get(c.split("_test_")[0], PairedCI()), spec))),
             *(_fmt(r.stats[c], c) for c in (*losses, *calib)),
             str(len(r.failed))] for r in report.rows]
    return md_table(header, rows)


def format_markdown(report: Report) -> str:
    spec, h = report.spec, report.spec.headline
    n_ok = sum(r.finished for r in report.runs)
    parts = [
        f"# SWA report: {report.root.name}",
        "",
        f"`{report.root}`: {len(report.runs)} runs ({n_ok} finished, "
        f"{len(report.runs) - n_ok} failed) in {len(report.rows)} configuration(s).",
        "",
        "Mean ± sample standard deviation over seeds of the finished runs' test metrics "
        f"(task {spec.name}{percent_note(spec, report.columns)}). SWA gain: "
        f"{spec.gain_text()}, paired by run, mean with a 95% t interval over seeds. Failed runs "
        "are not averaged.",
        "",
        report.table,
        "",
        *(["## Ensembles and soups", "",
           "From `ensemble.csv` (`python -m swa_research.ensemble`): the deep ensemble of all "
           "runs, the uniform soup and the final greedy soup of each kind of weights.", "",
           format_combined(report.combined), ""] if report.combined else []),
        *format_paper_section(report),
    ]
    if report.failed:
        parts += ["## Failed runs", "",
                  md_table(["run", "configuration", "seed", "status", "error"],
                            [[r.name, _label_of(report, r), show(r.seed), r.status,
                              (r.error or "").splitlines()[0][:200] if r.error else ""]
                             for r in report.failed]), ""]
    per_run = []
    for row in report.rows:
        for r in row.runs:
            sgd, swa = r.metric(("sgd", f"test_{h}")), r.metric(("swa", f"test_{h}"))
            scale, unit = spec.gain_scale()
            gain = "-" if sgd is None or swa is None else \
                f"{scale * spec.gain(sgd, swa):+.{2 if unit else 4}f}"
            per_run.append([r.name, row.label, show(r.seed), _fmt(Stat.of([sgd] if sgd is not
                            None else []), f"sgd_test_{h}"),
                            _fmt(Stat.of([swa] if swa is not None else []), f"swa_test_{h}"),
                            gain])
    parts += ["## Runs", "",
              md_table(["run", "configuration", "seed", f"SGD final {_label(spec, h)}",
                         f"SWA {_label(spec, h)}", f"gain{spec.gain_scale()[1]}"], per_run), ""]
    return "\n".join(parts)


def _label_of(report: Report, run: Run) -> str:
    for row in report.rows:
        if run in row.failed or run in row.runs:
            return row.label
    return "-"


# ---------------------------------------------------------------------------------------------
# Writing and W&B


def write_report(path: str | Path, runs: Sequence[str | Path] | None = None,
                 use_wandb: bool = True) -> Report:
    """Write report.md, report.csv and the PNG plots into ``path`` for the runs at or below
    ``runs`` (default: ``path`` itself), and log the table to W&B when the runs used it."""
    out = Path(path)
    report = build_report(list(runs) if runs else [out], root=out)
    atomic_write_text(out / "report.md", report.markdown)
    columns, data = report.csv_rows()
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows([["" if v is None else v for v in line] for line in data])
    atomic_write_text(out / "report.csv", buf.getvalue())
    report.files = [out / "report.md", out / "report.csv"]
    if report.paper:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_HEADER)
        writer.writerows([["" if v is None else v for v in comparison_csv_row(c)]
                          for c in report.paper])
        atomic_write_text(out / PAPER_CSV, buf.getvalue())
        report.files.append(out / PAPER_CSV)
    plots = [("report_swa_gain.png", plot_gain), (curves_file(report.spec), plot_accuracy)]
    if any(n.startswith("posthoc_ema_") for n in report.averages):
        plots.append((POSTHOC_EMA_PLOT, plot_posthoc_ema))
    for name, plot in plots:
        try:
            report.files.append(plot(report, out / name))
        except Exception as e:  # a plot is a convenience: keep the tables
            log.warning("could not write %s: %s", out / name, e)
    if use_wandb:
        report.wandb_run = log_to_wandb(report, out)
    return report


# ---------------------------------------------------------------------------------------------
# The end of a multirun




def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swa_research.report",
        description="Mean and spread over seeds per configuration, the SWA gain with a 95% "
                    "t interval, and the failed runs, for a sweep dir, run dirs, or a folder "
                    "above them.")
    parser.add_argument("paths", nargs="+", metavar="PATH")
    parser.add_argument("--out", default=None,
                        help="where report.md, report.csv and the plots go (default: PATH, or "
                             "the common parent of several PATHs)")
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log the report to W&B even when the runs used it")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.paths]
    for p in paths:
        if not p.is_dir():
            print(f"error: {p}: no such folder", file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else (
        paths[0] if len(paths) == 1 else Path(os.path.commonpath([p.resolve() for p in paths])))
    if not args.out and is_run_dir(out):
        print(f"error: {out} is one run's dir: a report is written beside runs, never into "
              "one; give a sweep dir, or --out DIR for where the report goes", file=sys.stderr)
        return 2
    try:
        report = write_report(out, runs=paths, use_wandb=not args.no_wandb)
    except (FileNotFoundError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    print(f"\nwrote {', '.join(str(p) for p in report.files)}")
    if report.wandb_run:
        print(f"logged to W&B: {report.wandb_run}")
    return 0

