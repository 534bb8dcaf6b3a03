"""Flatness around the SGD and SWA solutions of a finished run:
``python -m swa_research.analysis.flatness RUN_DIR [options]``.

- The line w(a) = (1 - a) * w_sgd + a * w_swa for a over ``--span`` (default -0.5 to 1.5, so
  beyond both ends): train and test loss and error at ``--points`` values of a (0 and 1
  always among them). The SWA paper's Figure 5 does the same between SGD and SWA.
- Filter-normalised random directions (Li et al., 2018, "Visualizing the Loss Landscape of
  Neural Nets"): for each of ``--directions`` Gaussian directions d, every filter (a conv
  kernel's output channel, a linear layer's row) is rescaled to the norm of the same filter
  of the weights it perturbs; biases and BN parameters get no perturbation. Loss and error at
  w + t * d for t in [-radius, radius], around each solution (the same draws for both).

The model is rebuilt from the run's ``.hydra/config.yaml`` with the package's builders and its
weights are read from ``sgd_final.pt`` and ``swa.pt``. With batch norm, the BN statistics are
recomputed at every point with one pass over the training data, as the trainer does for the
average (same batches, same augmentation: see ``Trainer.bn_batches``), so the point a = 1
reproduces the run's SWA test numbers; the SGD end (a = 0) then differs from the run's SGD
numbers, which used the running statistics of training. Writes ``flatness_line.csv``,
``flatness_directions.csv``, ``flatness_line.png`` and ``flatness_directions.png`` into the
run dir. Runs on the GPU when there is one (``--device``).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.averaging import bn_update, has_batch_norm
from swa_research.config import Config, UserError, bn_batch_size
from swa_research.data import (
    DataSplits,
    ImageSet,
    Preprocess,
    bn_pass_batches,
)
from swa_research.fileio import atomic_write_text, read_weights, weights_location
from swa_research.models import build_model
from swa_research.tasks import build_task
from swa_research.tracking.plots import pyplot, save_figure
from swa_research.training.build import load_run_config
from swa_research.training.evaluation import evaluate

log = logging.getLogger(__name__)

LINE_COLUMNS = ["alpha", "train_loss", "train_err", "test_loss", "test_err"]
DIRECTION_COLUMNS = ["center", "direction", "t", "train_loss", "train_err", "test_loss",
                     "test_err"]
State = dict[str, Tensor]


@dataclass
class LoadedRun:
    config: Config
    data: DataSplits
    model: nn.Module
    sgd: State
    swa: State
    iteration: int  # the run's last iteration: it seeds the BN batches, as in the trainer


def _load_weights(path: Path, device: torch.device) -> dict[str, Any]:
    if weights_location(path) is None:
        hint = (" (the run had no average: swa=none, or averaging never started)"
                if path.name == "swa.pt" else "")
        raise UserError(f"{path} not found{hint}; flatness needs sgd_final.pt and swa.pt "
                        "(trainer.save_checkpoints=true)")
    return read_weights(path, map_location=device)


def load_run(run_dir: str | Path, device: torch.device, num_workers: int = 0) -> LoadedRun:
    """The run's config, data (the same seeded split), model and both solutions' weights."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    sgd = _load_weights(run_dir / "sgd_final.pt", device)
    swa = _load_weights(run_dir / "swa.pt", device)
    task = build_task(config.task.name)
    if "acc" not in task.spec.metrics:
        raise UserError(f"{run_dir}: task {task.name} has no accuracy; the flatness analysis "
                        "plots error rates (classification runs)")
    data = task.build_data(config, device, num_workers)
    model = build_model(config.model, task.output_size(data), data.image_size).to(device)
    model.load_state_dict(sgd["state_dict"])
    return LoadedRun(config, data, model, sgd["state_dict"], swa["state_dict"],
                     int(sgd.get("iteration", 0)))


def interpolate(a: State, b: State, alpha: float) -> State:
    """(1 - alpha) * a + alpha * b for floating-point tensors (exactly a at 0, b at 1);
    integer buffers (BN's num_batches_tracked) are taken from ``a``."""
    return {k: (1.0 - alpha) * v + alpha * b[k] if v.is_floating_point() else v
            for k, v in a.items()}


def random_direction(weights: State, names: Sequence[str], generator: torch.Generator
                     ) -> State:
    """A Gaussian draw shaped like the parameters ``names`` of ``weights`` (on the CPU, so
    the same seed gives the same direction on any device)."""
    return {n: torch.randn(weights[n].shape, generator=generator, dtype=torch.float32)
            for n in names}


def filter_normalize(direction: State, weights: State) -> State:
    """Li et al.'s filter normalisation: each filter (slice along dim 0) of a weight with two
    or more dimensions gets the norm of the matching filter of ``weights``; one-dimensional
    parameters (biases, BN weight and bias) get zero."""
    out: State = {}
    for name, d in direction.items():
        w = weights[name]
        d = d.to(device=w.device, dtype=w.dtype)
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w)
            continue
        w_norm = w.flatten(1).norm(dim=1)
        d_norm = d.flatten(1).norm(dim=1)
        scale = (w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.dim() - 1)))
        out[name] = d * scale
    return out


def perturb(weights: State, direction: State, t: float) -> State:
    return {k: v + t * direction[k] if k in direction else v for k, v in weights.items()}


def value_grid(lo: float, hi: float, points: int, always: Sequence[float] = ()) -> list[float]:
    """``points`` evenly spaced values from lo to hi, plus the values in ``always``."""
    if points < 2:
        raise UserError(f"need at least 2 points, got {points}")
    if not hi > lo:
        raise UserError(f"the range needs low < high, got {lo} and {hi}")
    values = {round(lo + (hi - lo) * i / (points - 1), 12) for i in range(points)}
    return sorted(values | {float(a) for a in always})


class PointEvaluator:
    """Loads weights into the model, recomputes its BN statistics when it has BN (the
    trainer's procedure for the average), and evaluates on the train and test sets."""

    def __init__(self, run: LoadedRun, train_subset: int | None = None,
                 batch_size: int | None = None) -> None:
        self.run = run
        self.model = run.model
        cfg = run.config
        dc = cfg.data
        device = next(run.model.parameters()).device
        self.eval_pre = Preprocess(dc.normalize, dc.mean, dc.std, device)
        self.train_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, augment=dc.augment)
        self.batch_size = batch_size or cfg.trainer.eval_batch_size
        train = run.data.train
        if train_subset is not None and train_subset < len(train):
            # A fixed random subset, for both the train metrics and the BN pass.
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
            train = train.subset(perm[:train_subset])
        self.train: ImageSet = train
        self.bn = has_batch_norm(self.model)

    def bn_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        # As Trainer.bn_batches at the end of the run: the BN batch size, training
        # augmentation, the generator seeded from the seed and the last iteration.
        cfg = self.run.config
        return bn_pass_batches(self.train, bn_batch_size(cfg), cfg.seed, self.run.iteration,
                               self.train_pre)

    def __call__(self, weights: State) -> dict[str, float]:
        self.model.load_state_dict(weights)
        if self.bn:
            # The BN pass runs in train mode (dropout draws): keep the global RNG as it was.
            with torch.random.fork_rng(devices=[]):
                bn_update(self.bn_batches(), self.model)
        test = evaluate(self.model, self.run.data.test, self.eval_pre, self.batch_size)
        train = evaluate(self.model, self.train, self.eval_pre, self.batch_size)
        assert test["loss"] is not None and test["acc"] is not None
        assert train["loss"] is not None and train["acc"] is not None
        return {"train_loss": train["loss"], "train_err": 1.0 - train["acc"],
                "test_loss": test["loss"], "test_err": 1.0 - test["acc"]}


def line_scan(run: LoadedRun, alphas: Sequence[float], evaluator: PointEvaluator
              ) -> list[dict[str, float]]:
    rows = []
    for alpha in alphas:
        rows.append({"alpha": alpha, **evaluator(interpolate(run.sgd, run.swa, alpha))})
        log.info("alpha %+.3f: %s", alpha, _brief(rows[-1]))
    return rows


def direction_scan(run: LoadedRun, ts: Sequence[float], directions: int, seed: int,
                   evaluator: PointEvaluator) -> list[dict[str, Any]]:
    names = [n for n, _ in run.model.named_parameters()]
    rows: list[dict[str, Any]] = []
    for k in range(directions):
        raw = random_direction(run.sgd, names, torch.Generator().manual_seed(seed * 7919 + k))
        for center, weights in (("sgd", run.sgd), ("swa", run.swa)):
            d = filter_normalize(raw, weights)
            for t in ts:
                rows.append({"center": center, "direction": k, "t": t,
                             **evaluator(perturb(weights, d, t))})
                log.info("%s direction %d t %+.3f: %s", center, k, t, _brief(rows[-1]))
    return rows


def _brief(row: dict[str, Any]) -> str:
    return (f"train loss {row['train_loss']:.4f} err {100 * row['train_err']:.2f}% | "
            f"test loss {row['test_loss']:.4f} err {100 * row['test_err']:.2f}%")


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


Curve = tuple[list[float], list[float], dict[str, Any]]  # xs, ys, matplotlib styles


def plot_panels(path: Path, title: str, xlabel: str, panels: list[tuple[str, list[Curve]]],
                marks: Sequence[tuple[float, str]] = ()) -> Path:
    """Side-by-side panels, each a y label and its curves; ``marks`` are labelled vertical
    lines (x, name) drawn on every panel."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels, strict=True):
        for xs, ys, style in curves:
            ax.plot(xs, ys, marker=".", **style)
        for x, name in marks:
            ax.axvline(x, color="gray", ls="--", lw=0.8)
            ax.annotate(name, (x, 1.0), xycoords=("data", "axes fraction"), ha="center",
                        va="bottom")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, y=1.06)
    return save_figure(fig, path)


def plot_line(rows: list[dict[str, float]], path: Path, title: str) -> Path:
    alphas = [r["alpha"] for r in rows]
    panels = [(label, [(alphas, [scale * r[f"{split}_{metric}"] for r in rows],
                        {"color": color, "label": split})
                       for split, color in (("train", "tab:green"), ("test", "tab:red"))])
              for metric, label, scale in (("loss", "cross-entropy loss", 1.0),
                                           ("err", "error (%)", 100.0))]
    return plot_panels(path, f"From SGD to SWA and beyond ({title})",
                       "alpha: w = (1 - alpha) w_SGD + alpha w_SWA", panels,
                       marks=((0.0, "SGD"), (1.0, "SWA")))


def plot_directions(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    colors = {"sgd": "tab:blue", "swa": "tab:orange"}
    panels = []
    for key, label, scale in (("train_loss", "train loss", 1.0),
                              ("test_err", "test error (%)", 100.0)):
        curves: list[Curve] = []
        for center in ("sgd", "swa"):
            ks = sorted({r["direction"] for r in rows if r["center"] == center})
            for k in ks:
                pts = [r for r in rows if r["center"] == center and r["direction"] == k]
                curves.append(([r["t"] for r in pts], [scale * r[key] for r in pts],
                               {"color": colors[center], "alpha": 0.8,
                                "label": center.upper() if k == ks[0] else None}))
        panels.append((label, curves))
    return plot_panels(path, f"Random directions around SGD and SWA ({title})",
                       "t: w + t d (filter-normalised random direction d)", panels)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here")
    return torch.device(name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swa_research.analysis.flatness",
        description="Loss and error along the line from the SGD to the SWA weights and along "
                    "filter-normalised random directions around both; CSV and PNG files in "
                    "the run dir.")
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--points", type=int, default=21,
                        help="values of alpha on the line (default 21; 0 and 1 are added)")
    parser.add_argument("--span", type=float, nargs=2, default=(-0.5, 1.5),
                        metavar=("LOW", "HIGH"), help="range of alpha (default -0.5 1.5)")
    parser.add_argument("--directions", type=int, default=2,
                        help="random directions around each solution (default 2; 0: none)")
    parser.add_argument("--dir-points", type=int, default=11,
                        help="values of t along each direction (default 11; 0 is added)")
    parser.add_argument("--radius", type=float, default=1.0,
                        help="t runs from -radius to radius (default 1)")
    parser.add_argument("--train-subset", type=int, default=None, metavar="N",
                        help="use N random training images for the train metrics and the BN "
                             "pass (default: the whole training split)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="evaluation batch size (default: the run's "
                             "trainer.eval_batch_size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--num-workers", type=int, default=2,
                        help="threads that decode image folders (once; they are cached)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        if args.directions < 0 or args.radius <= 0:
            raise UserError("--directions must be >= 0 and --radius > 0")
        if args.train_subset is not None and args.train_subset < 1:
            raise UserError("--train-subset must be >= 1")
        alphas = value_grid(args.span[0], args.span[1], args.points, always=(0.0, 1.0))
        ts = value_grid(-args.radius, args.radius, args.dir_points, always=(0.0,))
        device = resolve_device(args.device)
        run = load_run(run_dir, device, args.num_workers)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    evaluator = PointEvaluator(run, args.train_subset, args.batch_size)
    print(f"flatness of {run_dir} on {device}: {len(alphas)} points on the line, "
          f"{args.directions} direction(s) x {len(ts)} points around each solution; "
          f"{len(evaluator.train)} train / {len(run.data.test)} test images; BN statistics "
          f"{'recomputed at every point' if evaluator.bn else 'none (no BN layers)'}",
          flush=True)
    start = time.perf_counter()
    title = run_dir.resolve().name
    line = line_scan(run, alphas, evaluator)
    write_csv(run_dir / "flatness_line.csv", LINE_COLUMNS, line)
    written = [run_dir / "flatness_line.csv", plot_line(line, run_dir / "flatness_line.png",
                                                        title)]
    if args.directions:
        dirs = direction_scan(run, ts, args.directions, args.seed, evaluator)
        write_csv(run_dir / "flatness_directions.csv", DIRECTION_COLUMNS, dirs)
        written += [run_dir / "flatness_directions.csv",
                    plot_directions(dirs, run_dir / "flatness_directions.png", title)]
    for row in line:
        if row["alpha"] in (0.0, 1.0):
            name = "SGD" if row["alpha"] == 0.0 else "SWA"
            print(f"  {name} (alpha={row['alpha']:g}): {_brief(row)}")
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.exit(main())
