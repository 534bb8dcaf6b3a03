"""A W&B dashboard for a sweep: ``python -m swa_research.dashboard SWEEP_DIR [--group G]
[--publish]``, and at the end of a multirun with ``logger=wandb logger.dashboard=true``.

The dashboard is first built as data, by a pure function of the sweep (:func:`build_dashboard`:
no file written, no network): a W&B report whose run set is the sweep's W&B group, grouped by
the swept keys (the sweep report's "configuration"), with these panels:

- ``scatter``: ``sgd/test_acc`` against ``swa/test_acc``, one point per run, each configuration
  in its own colour, both axes over the same range so that the diagonal (SWA = SGD) runs from
  corner to corner; points above it are SWA gains;
- ``swa_gain``: ``swa_gain`` per configuration (bars: W&B's mean ± standard error), beside the
  sweep report's mean with its 95% t interval over seeds (``swa_gain_ci``);
- ``accuracy_curves``: SGD and every average's test accuracy over epochs, the mean per
  configuration with a ± one standard deviation band;
- ``parallel``: parallel coordinates from the swept keys to ``swa/test_acc``;
- ``calibration_ece`` and ``calibration_nll``: each model's ECE and NLL per configuration;
- ``report_table``: the sweep report's table (``report/table`` of the report run) and the same
  numbers as text; the runs table shows the swept keys, accuracies, gain and calibration.

Every metric a panel names is checked against the keys the runs log (:func:`logged_keys`,
taken from the W&B logger's own code), so a renamed metric fails here, not as an empty panel.

The specification is saved as ``SWEEP_DIR/dashboard.json``. When the runs logged online, it is
also published as a W&B report through ``wandb-workspaces`` (``pip install
"swa_research[dashboard]"``) and its URL printed; offline (or without credentials) nothing
touches the network and one line gives the command that publishes it later.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swa_research.analysis.report import Report, build_report
from swa_research.analysis.runset import show
from swa_research.fileio import atomic_write_text
from swa_research.tasks import CLASSIFICATION, TaskMetrics
from swa_research.tracking.loggers import (
    WANDB_ID_FILE,
    WandbLogger,
    history_columns,
    summary_values,
)
from swa_research.tracking.runs import is_run_dir

log = logging.getLogger(__name__)

DASHBOARD_FILE = "dashboard.json"
SPEC_VERSION = 1
# The metrics the panels name besides the task's headline (``<model>/test_<headline>``: the
# accuracy for classification) and the averages' ECE and NLL, added per sweep.
GAIN = "swa_gain"
CURVE_X = "epoch"
REPORT_TABLE = "report/table"  # the report run's wandb.Table (swa_research.analysis.report)
# One colour per configuration (matplotlib's tab10, as the local plots).
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


class _Recorder:
    """Stands in for a wandb run: keeps the keys that the logger logs."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def log(self, data: dict[str, Any]) -> None:
        self.keys.update(data)


def logged_keys(averages: Sequence[str] = ("swa",), spec: TaskMetrics = CLASSIFICATION
                ) -> set[str]:
    """The keys a run with these averages logs to W&B: its summary (``summary_values``) and its
    per-evaluation history, the latter from :class:`WandbLogger`'s own ``log_eval``."""
    names = ["swa", *[n for n in averages if n != "swa"]]
    skeleton: dict[str, Any] = {"status": "finished", "averages": names, "train": {},
                                "task": spec.record()}
    keys = set(summary_values(skeleton))
    logger = WandbLogger.__new__(WandbLogger)  # no wandb.init: only its log_eval's keys
    recorder = _Recorder()
    logger.run, logger.averages, logger._warned = recorder, names, False
    logger.log_eval({c: 0.0 for c in history_columns(names, spec.metrics)})
    return keys | recorder.keys


def _config_column(key: str) -> str:
    """A config key as W&B's report addresses it: the runs log the config flat, with dotted
    names (``swa.lr``), which W&B keeps as ``{"swa.lr": {"value": ...}}``."""
    return f"config.{key}.value"


def _averages(report: Report) -> list[str]:
    names = ["swa"]
    for run in report.runs:
        names += [n for n in (run.metrics or {}).get("averages") or [] if n not in names]
    return names


def _target(report: Report, group: str | None) -> dict[str, Any]:
    """Project, entity, group and mode of the runs' W&B record (the sweep folder's name as the
    group when the runs did not log to W&B)."""
    targets = [r.wandb for r in report.runs if r.wandb is not None]
    t = targets[0] if targets else None
    return {"project": t.project if t else "swa_research", "entity": t.entity if t else None,
            "group": group or (t.group if t and t.group else report.root.name),
            "mode": t.mode if t else None, "logged_to_wandb": bool(targets)}


def _run_id(run_dir: Path) -> str | None:
    try:
        return (run_dir / WANDB_ID_FILE).read_text().strip() or None
    except OSError:
        return None


def _axis_range(report: Report) -> list[float]:
    """One range for both axes of the scatter: all SGD and SWA values of the headline metric
    (accuracies: within [0, 1]), padded."""
    key = f"test_{report.spec.headline}"
    values = [v for r in report.runs if r.finished
              for v in (r.metric(("sgd", key)), r.metric(("swa", key))) if v is not None]
    if not values:
        return [0.0, 1.0]
    lo, hi = min(values), max(values)
    pad = max(0.01, 0.05 * (hi - lo))
    if report.spec.headline not in report.spec.percent:
        return [round(lo - pad, 4), round(hi + pad, 4)]
    return [round(max(0.0, lo - pad), 4), round(min(1.0, hi + pad), 4)]


def build_dashboard(report: Report, group: str | None = None) -> dict[str, Any]:
    """The dashboard of the sweep in ``report`` as data (what dashboard.json holds)."""
    target = _target(report, group)
    averages = _averages(report)
    models = ["sgd", *averages]
    groupby = [_config_column(k) for k in report.keys] or ["group"]
    configurations = []
    for i, row in enumerate(report.rows):
        g = row.gain
        configurations.append({
            "label": row.label, "values": {k: show(v) for k, v in row.values.items()},
            "color": PALETTE[i % len(PALETTE)],
            "runs": [r.name for r in row.runs], "failed": [r.name for r in row.failed],
            "wandb_run_ids": [i for r in (*row.runs, *row.failed) if (i := _run_id(r.path))],
            "swa_gain": {"mean": g.mean, "std": g.std, "low": g.low, "high": g.high,
                         "n": g.n, "level": g.level}})
    lo, hi = _axis_range(report)
    ece = [f"calibration/{m}_ece" for m in models]
    nll = [f"calibration/{m}_nll" for m in models]
    columns, data = report.csv_rows()
    h, what = report.spec.headline, f"test {report.spec.title(report.spec.headline)}"
    scatter_x, scatter_y = f"sgd/test_{h}", f"swa/test_{h}"
    above = "above" if h in report.spec.maximize else "below"
    panels: list[dict[str, Any]] = [
        {"id": "scatter", "type": "scatter", "title": f"SWA vs final SGD {what} "
         f"({above} the diagonal: SWA gains)", "x": scatter_x, "y": scatter_y,
         "range_x": [lo, hi], "range_y": [lo, hi], "diagonal": [[lo, lo], [hi, hi]],
         "points": "run", "color_by": "configuration"},
        {"id": "swa_gain", "type": "bar", "title": f"SWA gain ({report.spec.gain_text()})",
         "metrics": [GAIN], "groupby": groupby, "aggregate": "mean", "range": "stderr"},
        {"id": "swa_gain_ci", "type": "markdown",
         "title": "SWA gain, mean with the sweep report's 95% t interval over seeds",
         "metrics": [GAIN], "text": _gain_markdown(configurations)},
        {"id": "accuracy_curves", "type": "line", "title": f"{what.capitalize()} over epochs "
         "(mean per configuration, band: ± one std)", "x": CURVE_X,
         "y": [f"{m}/test_{h}" for m in models], "groupby": groupby, "aggregate": "mean",
         "range": "stddev"},
        {"id": "parallel", "type": "parallel_coordinates",
         "title": f"Swept keys to SWA {what}",
         "columns": [*(_config_column(k) for k in report.keys), f"summary:{scatter_y}"],
         "metrics": [scatter_y]},
        {"id": "calibration_ece", "type": "bar", "title": "Expected calibration error",
         "metrics": ece, "groupby": groupby, "aggregate": "mean", "range": "stddev"},
        {"id": "calibration_nll", "type": "bar", "title": "Test NLL", "metrics": nll,
         "groupby": groupby, "aggregate": "mean", "range": "stddev"},
        {"id": "report_table", "type": "table", "title": "The sweep report",
         "table": REPORT_TABLE, "columns": columns,
         "rows": [[None if v is None else v for v in line] for line in data],
         "markdown": report.table},
    ]
    runs_columns = [*(f"config:{k}.value" for k in report.keys), "config:seed.value",
                    *(f"summary:{m}" for m in (scatter_x, f"sgd_best_val/test_{h}",
                                               *(f"{a}/test_{h}" for a in averages), GAIN,
                                               *ece, *nll, "status"))]
    spec = {
        "version": SPEC_VERSION,
        "title": f"SWA sweep {target['group']}",
        "description": (f"{len(report.runs)} runs ({len(report.failed)} failed) of "
                        f"{report.root} in {len(report.rows)} configuration(s); swept keys: "
                        f"{', '.join(report.keys) or 'none'}"),
        "sweep_dir": str(report.root), **target,
        "keys": list(report.keys), "averages": averages,
        "runset": {"name": f"sweep {target['group']}", "filters": f"Group = {target['group']!r}",
                   "groupby": groupby, "columns": runs_columns},
        "report_runset": {"name": "sweep report",
                          "filters": f"Group = {target['group']!r} and JobType = 'report'"},
        "configurations": configurations,
        "panels": panels,
    }
    missing = sorted(set(panel_metrics(spec)) - logged_keys(averages, report.spec))
    if missing:  # a renamed metric: fail here rather than show an empty panel
        raise ValueError(f"dashboard panels name metrics the runs do not log: {missing}")
    return spec


def _gain_markdown(configurations: list[dict[str, Any]]) -> str:
    lines = ["| configuration | n | SWA gain pp | 95% CI |", "| --- | --- | --- | --- |"]
    for c in configurations:
        g = c["swa_gain"]
        mean = "-" if g["mean"] is None else f"{100 * g['mean']:+.2f}"
        ci = ("-" if g["low"] is None else f"[{100 * g['low']:+.2f}, {100 * g['high']:+.2f}]")
        lines.append(f"| {c['label']} | {g['n']} | {mean} | {ci} |")
    return "\n".join(lines)


def panel_metrics(spec: dict[str, Any]) -> list[str]:
    """Every logged metric the panels and the runs table name (config keys aside)."""
    out: list[str] = []
    for p in spec["panels"]:
        for key in ("x", "y", "metrics"):
            value = p.get(key)
            names = value if isinstance(value, list) else [value] if value else []
            out += [n for n in names if n not in out]
    for col in spec["runset"]["columns"]:
        if col.startswith("summary:") and col[len("summary:"):] not in out:
            out.append(col[len("summary:"):])
    return out


def dashboard_spec(sweep_dir: str | Path, group: str | None = None) -> dict[str, Any]:
    """The dashboard of the runs at or below ``sweep_dir`` (FileNotFoundError: none there)."""
    return build_dashboard(build_report([sweep_dir], root=sweep_dir), group=group)


def write_dashboard(sweep_dir: str | Path, spec: dict[str, Any]) -> Path:
    path = Path(sweep_dir) / DASHBOARD_FILE
    atomic_write_text(path, json.dumps(spec, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# wandb-workspaces


def to_report(spec: dict[str, Any], entity: str | None = None) -> Any:
    """The specification as ``wandb_workspaces.reports.v2`` objects (nothing is saved; no
    network while ``entity`` or the spec's entity is given)."""
    import wandb_workspaces.reports.v2 as wr

    entity = entity or spec.get("entity")
    if not entity:
        import wandb

        entity = wandb.Api().default_entity
    project = spec["project"]
    rs = spec["runset"]
    runset = wr.Runset(entity=entity, project=project, name=rs["name"], filters=rs["filters"],
                       groupby=rs["groupby"], visible_columns=rs["columns"])
    colors: dict[Any, str] = {}
    if spec["keys"]:
        for c in spec["configurations"]:
            key = wr.RunsetGroup(runset_name=rs["name"], keys=tuple(
                wr.RunsetGroupKey(key=_config_column(k), value=v) for k, v in c["values"].items()))
            colors[key] = c["color"]

    def layout(i: int, w: int = 12, h: int = 8) -> Any:
        return wr.Layout(x=(i % 2) * 12, y=(i // 2) * h, w=w, h=h)

    panels: list[Any] = []
    table = None
    for p in spec["panels"]:
        at = layout(len(panels))
        if p["type"] == "scatter":
            panels.append(wr.ScatterPlot(
                title=p["title"], x=wr.SummaryMetric(p["x"]), y=wr.SummaryMetric(p["y"]),
                range_x=tuple(p["range_x"]), range_y=tuple(p["range_y"]), layout=at))
        elif p["type"] == "bar":
            panels.append(wr.BarPlot(title=p["title"], metrics=p["metrics"],
                                     groupby_aggfunc=p["aggregate"],
                                     groupby_rangefunc=p["range"], layout=at))
        elif p["type"] == "line":
            panels.append(wr.LinePlot(title=p["title"], x=p["x"], y=p["y"],
                                      groupby_aggfunc=p["aggregate"],
                                      groupby_rangefunc=p["range"], aggregate=True,
                                      layout=at))
        elif p["type"] == "parallel_coordinates":
            panels.append(wr.ParallelCoordinatesPlot(title=p["title"], columns=[
                wr.ParallelCoordinatesPlotColumn(
                    metric=wr.SummaryMetric(c[len("summary:"):]) if c.startswith("summary:")
                    else c) for c in p["columns"]], layout=at))
        elif p["type"] == "markdown":
            panels.append(wr.MarkdownPanel(markdown=f"**{p['title']}**\n\n{p['text']}",
                                           layout=at))
        elif p["type"] == "table":
            table = p
    blocks: list[Any] = [
        wr.P(text=spec["description"]),
        wr.PanelGrid(runsets=[runset], panels=panels, custom_run_colors=colors),
    ]
    if table is not None:
        blocks += [wr.H2(text=table["title"]), wr.MarkdownBlock(text=table["markdown"]),
                   wr.PanelGrid(runsets=[wr.Runset(entity=entity, project=project,
                                                   name=spec["report_runset"]["name"],
                                                   filters=spec["report_runset"]["filters"])],
                                panels=[wr.WeavePanelSummaryTable(
                                    table_name=table["table"], layout=wr.Layout(w=24, h=10))])]
    return wr.Report(entity=entity, project=project, title=spec["title"][:128],
                     description=spec["description"], blocks=blocks, width="fluid")


def publish(spec: dict[str, Any]) -> str:
    """Save the report on the W&B server; returns its URL."""
    report = to_report(spec)
    report.save()
    return str(report.url)


# ---------------------------------------------------------------------------------------------
# The end of a multirun, and the command


def publish_command(sweep_dir: Path) -> str:
    return f"python -m swa_research.dashboard {sweep_dir} --publish"


def make_dashboard(sweep_dir: Path, group: str | None = None, force_publish: bool = False
                   ) -> tuple[Path, str]:
    """Write dashboard.json; publish it when the runs logged online (or ``force_publish``).
    Returns the file and the one line to print. Raises on a failed publish only when it was
    asked for (``force_publish``)."""
    spec = dashboard_spec(sweep_dir, group=group)
    path = write_dashboard(sweep_dir, spec)
    if not force_publish and spec["mode"] != "online":
        why = "the runs logged offline" if spec["logged_to_wandb"] else \
            "the runs did not log to W&B (logger=wandb)"
        return path, (f"W&B dashboard: {why}; its specification is in {path}; publish it "
                      f"(after `wandb sync` of the runs) with: {publish_command(sweep_dir)}")
    try:
        url = publish(spec)
    except ImportError as e:
        if force_publish:
            raise RuntimeError(f"{e}; install it with: pip install "
                               "\"swa_research[dashboard]\"") from e
        return path, (f"W&B dashboard: not published (wandb-workspaces is not installed: pip "
                      f"install \"swa_research[dashboard]\"); its specification is in {path}; "
                      f"publish it with: {publish_command(sweep_dir)}")
    except Exception as e:
        if force_publish:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        return path, (f"W&B dashboard: not published ({type(e).__name__}: {first}); its "
                      f"specification is in {path}; publish it with: "
                      f"{publish_command(sweep_dir)}")
    return path, f"W&B dashboard: {url}"


def wanted(report: Report) -> bool:
    """Whether the runs asked for a dashboard: logger=wandb with logger.dashboard=true."""
    return any(r.config.get("logger.backend") == "wandb" and r.config.get("logger.dashboard")
               for r in report.runs)


def end_of_sweep(sweep_dir: Path) -> None:
    """The multirun's dashboard, when its runs asked for one. Never raises: a multirun's
    outcome and exit code must not depend on its dashboard."""
    try:
        if not wanted(build_report([sweep_dir], root=sweep_dir)):
            return
        _, line = make_dashboard(sweep_dir)
    except Exception as e:
        print(f"warning: no W&B dashboard for {sweep_dir}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swa_research.dashboard",
        description="The W&B dashboard of a sweep: writes its specification into "
                    f"SWEEP_DIR/{DASHBOARD_FILE} and publishes it as a W&B report when the "
                    "runs logged online (or with --publish).")
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR")
    parser.add_argument("--group", default=None,
                        help="the W&B group of the runs (default: the one they logged to)")
    parser.add_argument("--publish", action="store_true",
                        help="publish the report now (needs the W&B server and an API key)")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir}: no such folder", file=sys.stderr)
        return 2
    if is_run_dir(sweep_dir):
        print(f"error: {sweep_dir} is one run's dir, not a sweep dir: the dashboard of a sweep "
              "is written into the sweep's folder (outputs/multirun/...)", file=sys.stderr)
        return 2
    try:
        _, line = make_dashboard(sweep_dir, group=args.group, force_publish=args.publish)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"error: could not publish the dashboard: {type(e).__name__}: {first}",
              file=sys.stderr)
        return 1
    print(line)
    return 0

