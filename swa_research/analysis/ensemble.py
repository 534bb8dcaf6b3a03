"""Ensembles and soups of a sweep's finished runs: ``python -m swa_research.ensemble SWEEP_DIR
[--kinds sgd,swa] [--device auto|cpu|cuda]``.

For each kind of weights the runs saved (``sgd``: ``sgd_final.pt``; ``swa``, ``ema``, ...: the
averages' files), over the runs ordered by validation accuracy (best first):

- ``ensemble``: the deep ensemble (Lakshminarayanan et al. 2017) of the first k runs, for every
  k: the mean of their softmax probabilities.
- ``uniform_soup``: the weights of all runs averaged, BN statistics recomputed (Wortsman et al.
  2022, "Model soups").
- ``greedy_soup``: runs added in that order when the soup's validation accuracy rises (strictly,
  as model-soups' ``main.py``: a tie keeps the soup as it was; each candidate's BN statistics
  recomputed); a row per candidate, ``accepted`` 1 or 0.
- ``single``: each run's own weights, for reference.

An FGE run's ``fge.pt`` holds its ensemble's members: its ``fge`` member is their mean
probabilities (the run's FGE), and it is not souped (an ensemble is not one set of weights).

Each is evaluated on val and test (accuracy, loss; NLL and ECE on test) and written to
``ensemble.csv`` and ``ensemble.png`` (test accuracy against the number of members for the
ensembles and the greedy soups; each run's SGD and SWA marked) in the sweep dir, atomically;
when the runs logged to W&B, both go to a W&B run of job_type "ensemble" in their project and
group (and the sweep report's W&B run shows them too). The
runs must share the model and the data; soups also an initialization (the same seed, or the same
``trainer.init_weights`` or ``model.weights``): otherwise they are refused with one line saying
why.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from swa_research.analysis.report_wandb import log_ensemble
from swa_research.analysis.runset import load_run
from swa_research.averaging import average_states, classification_metrics
from swa_research.config import UserError, flatten_dict
from swa_research.fileio import atomic_write_text, read_weights, weights_location
from swa_research.models import load_state
from swa_research.tracking.runs import find_run_dirs, is_run_dir, read_run
from swa_research.training.build import resolve_device
from swa_research.training.evaluation import collect_logits
from swa_research.training.step import autocast

log = logging.getLogger(__name__)

CSV_FILE, PLOT_FILE = "ensemble.csv", "ensemble.png"
COLUMNS = ["combination", "kind", "members", "accepted", "runs", "val_acc", "val_loss",
           "test_acc", "test_loss", "test_nll", "test_ece", "note"]
LEFT_OUT = "left_out"  # a row per run left out of a kind (kind "all": of every kind), and why
SPLITS = ("val", "test")
WEIGHT_FILES = {"sgd": "sgd_final.pt"}  # an average's file is <name>.pt


@dataclass
class Member:
    """One run's weights of one kind, and its probabilities of the val and test sets."""

    run: str
    kind: str
    state: dict[str, Tensor] | None  # None: an ensemble itself (FGE), never souped
    probs: dict[str, Tensor | None]

    def val_acc(self, labels: dict[str, Tensor]) -> float:
        p = self.probs["val"]
        return -math.inf if p is None else float((p.argmax(1) == labels["val"]).double().mean())


def weight_file(kind: str) -> str:
    return WEIGHT_FILES.get(kind, f"{kind}.pt")


def left_out_reason(record: Any) -> str:
    """Why a run that is not finished is left out, in a few words."""
    if record.status == "no metrics.json":
        return "unfinished: no metrics.json (running, or killed before it ended)"
    error = f": {record.error}" if record.error else ""
    return f"status {record.status}{error}"


def check_runs(run_dirs: Sequence[Path]
               ) -> tuple[list[Path], str | None, list[tuple[str, str]]]:
    """The finished runs, checked to share a model and data (else a UserError); the reason
    soups cannot be formed (no shared initialization), or None; and the runs left out, each
    with why."""
    records = [read_run(d) for d in run_dirs]
    finished = [r for r in records if r.finished]
    left = [(r.run_dir.name, left_out_reason(r)) for r in records if not r.finished]
    if len(finished) < 1:
        why = "; ".join(f"{n}: {w}" for n, w in left)
        raise UserError("no finished run to combine (metrics.json status finished)"
                        + (f" ({why})" if why else ""))
    flat = [flatten_dict(r.config) for r in finished]
    check_splits(finished, flat)
    names = [f.get("model.name") for f in flat]
    for record, name in zip(finished, names, strict=True):
        if name != names[0]:  # named before its options, which differ with it
            raise UserError(f"runs of different models cannot be combined: model={names[0]} in "
                            f"{finished[0].run_dir.name}, model={name} in {record.run_dir.name}")
    for prefix, what in (("model.", "model"), ("data.", "data"), ("task.", "task")):
        keys = sorted({k for f in flat for k in f if k.startswith(prefix)})
        for key in keys:
            values = {repr(f.get(key)) for f in flat}
            if len(values) > 1 and key not in ("data.root", "data.split_seed"):
                first = next(f for f in flat if repr(f.get(key)) != repr(flat[0].get(key)))
                raise UserError(
                    f"runs of different {what}s cannot be combined: {key}={flat[0].get(key)} "
                    f"in {finished[0].run_dir.name}, {first.get(key)} in "
                    f"{finished[flat.index(first)].run_dir.name}")
    if str(flat[0].get("task.name", "classification")) != "classification":
        raise UserError(f"task={flat[0].get('task.name')}: ensembles and soups average class "
                        "probabilities and are scored by accuracy (task=classification)")
    seeds = {f.get("seed") for f in flat}
    starts = {(f.get("model.weights"), f.get("trainer.init_weights")) for f in flat}
    soups = None
    if len(seeds) > 1 and (starts == {(None, None)} or len(starts) > 1):
        soups = (f"soups need runs from one initialization: these have seeds "
                 f"{sorted(seeds, key=str)} and no shared trainer.init_weights or "
                 "model.weights, so their weights are not averaged (the deep ensemble is "
                 "formed)")
    return [r.run_dir for r in finished], soups, left


def split_seed(flat: dict[str, Any]) -> Any:
    """The seed a run's validation split was drawn with: ``data.split_seed``, or for a run
    written before that key, its training seed."""
    return flat["data.split_seed"] if "data.split_seed" in flat else flat.get("seed")


def check_splits(records: Sequence[Any], flat: Sequence[dict[str, Any]]) -> None:
    """Runs that held out different examples cannot be ranked or souped together: one run's
    validation images are another's training images."""
    seeds = [split_seed(f) for f in flat]
    for record, f, seed in zip(records, flat, seeds, strict=True):
        if seed != seeds[0]:
            def what(f: dict[str, Any], seed: Any) -> str:
                return (f"data.split_seed={seed}" if "data.split_seed" in f
                        else f"seed={seed} (written before data.split_seed)")
            raise UserError(
                f"the runs hold out different validation images ({what(flat[0], seeds[0])} in "
                f"{records[0].run_dir.name}, {what(f, seed)} in {record.run_dir.name}): one "
                "run's validation images are another's training images; combine runs of one "
                "data.split_seed")


class Combiner:
    """The sweep's data and model rebuilt once (from its first run), the members' probabilities,
    and the evaluation of an ensemble or a soup."""

    def __init__(self, run_dirs: Sequence[Path], device: torch.device) -> None:
        from swa_research.analysis.posthoc import PosthocRun

        self.base = PosthocRun(run_dirs[0], device, snapshots=False)
        self.device = device
        data = self.base.data
        self.labels = {s: getattr(data, s).labels.cpu() for s in SPLITS
                       if getattr(data, s) is not None}

    def load(self, run_dir: Path, kind: str) -> list[dict[str, Tensor]] | None:
        """The run's weights of ``kind``: one state, or an ensemble's members (``fge.pt``)."""
        path = weights_location(run_dir / weight_file(kind))  # X.pt, or the sharded X.dcp
        if path is None:
            return None
        try:
            saved = read_weights(path)
        except Exception as e:
            raise UserError(f"{path} cannot be read ({type(e).__name__}); rerun that run to "
                            "write it again") from None
        return list(saved["members"]) if saved.get("members") else [saved["state_dict"]]

    def module(self, state: dict[str, Tensor], where: str) -> nn.Module:
        return load_state(self.base.model, state, where)

    @torch.no_grad()
    def probs(self, module: nn.Module) -> dict[str, Tensor | None]:
        out: dict[str, Tensor | None] = {}
        bs = self.base.config.trainer.eval_batch_size
        for split in SPLITS:
            data = getattr(self.base.data, split)
            if data is None:
                out[split] = None
                continue
            with autocast(self.base.precision, self.device):
                logits, _ = collect_logits(module, data, self.base.eval_pre, bs)
            out[split] = torch.softmax(logits.float(), dim=1)
        return out

    def scores(self, probs: dict[str, Tensor | None]) -> dict[str, float | None]:
        row: dict[str, float | None] = {}
        for split in SPLITS:
            p = probs.get(split)
            if p is None:
                row.update({f"{split}_acc": None, f"{split}_loss": None})
                continue
            m = classification_metrics(torch.log(p.clamp_min(1e-40)), self.labels[split])
            row.update({f"{split}_acc": m["acc"], f"{split}_loss": m["loss"]})
            if split == "test":
                row.update({"test_nll": m["nll"], "test_ece": m["ece"]})
        return row

    def soup_probs(self, states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor | None]:
        """The probabilities of the equal average of ``states`` with fresh BN statistics."""
        module = average_states(self.base.model, iter(states), kind="swa")
        return self.probs(self.base.with_bn(module))


def mean_probs(probs: Sequence[dict[str, Tensor | None]]) -> dict[str, Tensor | None]:
    """The mean of several models' probabilities of each split: their ensemble's."""
    return {s: (None if probs[0][s] is None else
                torch.stack([p[s] for p in probs]).mean(0))  # type: ignore[misc]
            for s in SPLITS}


def known_kinds(run_dirs: Sequence[Path]) -> list[str]:
    """The weights the finished runs can have saved: sgd and their averages' names."""
    names: dict[str, None] = {"sgd": None}
    for d in run_dirs:
        metrics = read_run(d).metrics or {}
        names.update(dict.fromkeys(str(n) for n in metrics.get("averages", []) or []))
    return list(names)


def combine(combiner: Combiner, run_dirs: Sequence[Path], kinds: Sequence[str],
            soups_refused: str | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    computed: list[str] = []

    def add(combination: str, kind: str, members: Sequence[Member],
            probs: dict[str, Tensor | None], accepted: int | None = None) -> dict[str, Any]:
        row = {"combination": combination, "kind": kind, "members": len(members),
               "accepted": accepted, "runs": ";".join(m.run for m in members),
               **combiner.scores(probs)}
        rows.append(row)
        return row

    for kind in kinds:
        members: list[Member] = []
        for d in run_dirs:
            states = combiner.load(d, kind)
            if states is None:
                note = f"no {weight_file(kind)} (trainer.save_checkpoints=false, an average " \
                       "never updated, or the file was removed)"
                rows.append({"combination": LEFT_OUT, "kind": kind, "runs": d.name,
                             "note": note})
                print(f"{kind}: left out {d.name}: {note}", flush=True)
                continue
            where = str(d / weight_file(kind))
            probs = mean_probs([combiner.probs(combiner.module(st, where)) for st in states])
            members.append(Member(d.name, kind, states[0] if len(states) == 1 else None,
                                  probs))
        if not members:
            log.warning("no run saved %s weights (%s): skipped", kind, weight_file(kind))
            continue
        computed.append(kind)
        # Best validation accuracy first (the run order where there is no validation set).
        members.sort(key=lambda m: -m.val_acc(combiner.labels))
        t0 = time.perf_counter()
        for m in members:
            add("single", kind, [m], m.probs)
        for k in range(1, len(members) + 1):
            add("ensemble", kind, members[:k], mean_probs([m.probs for m in members[:k]]))
        soups = soups_refused is None and all(m.state is not None for m in members)
        if soups:
            add("uniform_soup", kind, members, combiner.soup_probs([m.state for m in members]))
            greedy_soup(combiner, members, kind, add)
        print(f"{kind}: {len(members)} runs | ensemble of {len(members)} test acc "
              f"{100 * rows_of(rows, 'ensemble', kind)[-1]['test_acc']:.2f}%"
              + ("" if not soups else
                 f" | uniform soup {100 * rows_of(rows, 'uniform_soup', kind)[-1]['test_acc']:.2f}%"
                 f" | greedy soup {100 * greedy_final(rows, kind)['test_acc']:.2f}%")
              + f" | {time.perf_counter() - t0:.1f}s", flush=True)
    return rows


def greedy_soup(combiner: Combiner, members: Sequence[Member], kind: str, add: Any) -> None:
    """Wortsman et al.'s greedy soup: from the best run, each next run is kept when the soup
    with it is more accurate on validation (``>``, as mlfoundations/model-soups' ``main.py``:
    a candidate that ties is left out)."""
    if members[0].probs["val"] is None:
        log.warning("the greedy soup needs a validation split (data.val_fraction > 0): skipped")
        return
    soup = [members[0]]
    best = add("greedy_soup", kind, soup, members[0].probs, accepted=1)["val_acc"]
    for m in members[1:]:
        probs = combiner.soup_probs([x.state for x in (*soup, m)])
        candidate = combiner.scores(probs)
        if candidate["val_acc"] > best:
            soup.append(m)
            best = add("greedy_soup", kind, soup, probs, accepted=1)["val_acc"]
        else:
            rows = add("greedy_soup", kind, [*soup, m], probs, accepted=0)
            rows["members"] = len(soup)  # the soup stays as it was


def merged(path: Path, rows: Sequence[dict[str, Any]], kinds: Sequence[str]
           ) -> list[dict[str, Any]]:
    """The rows of an earlier ensemble.csv of kinds this run of the tool did not compute,
    then ``rows``: a run for some kinds never removes the others' results."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            earlier = list(csv.DictReader(f))
    except FileNotFoundError:
        return list(rows)
    except (OSError, csv.Error) as e:
        raise UserError(f"{path} cannot be read ({e}); move it away to write a new one") from None
    def value(key: str, v: str | None) -> Any:
        if v in ("", None):
            return None
        if key in ("members", "accepted"):
            return int(v)
        return float(v) if key.startswith(("val_", "test_")) else v

    kept = [{k: value(k, v) for k, v in r.items() if k in COLUMNS}
            for r in earlier if r.get("kind") not in kinds and r.get("kind") != "all"]
    return [*kept, *rows]


def rows_of(rows: Sequence[dict[str, Any]], combination: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["combination"] == combination and r["kind"] == kind]


def greedy_final(rows: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    return [r for r in rows_of(rows, "greedy_soup", kind) if r["accepted"]][-1]


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy against the number of members: the deep ensemble and the greedy soup of
    each kind, the uniform soup at all runs, each run's own weights at 1."""
    from swa_research.tracking.plots import COLORS, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    kinds = list(dict.fromkeys(r["kind"] for r in rows if r["combination"] != LEFT_OUT))
    for i, kind in enumerate(kinds):
        color = COLORS[i % len(COLORS)]
        ens = rows_of(rows, "ensemble", kind)
        ax.plot([r["members"] for r in ens], [100 * r["test_acc"] for r in ens], marker=".",
                color=color, label=f"{kind.upper()} deep ensemble")
        greedy = [r for r in rows_of(rows, "greedy_soup", kind) if r["accepted"]]
        if greedy:
            ax.plot([r["members"] for r in greedy], [100 * r["test_acc"] for r in greedy],
                    ls="--", marker="s", color=color, label=f"{kind.upper()} greedy soup")
        for r in rows_of(rows, "uniform_soup", kind):
            ax.scatter([r["members"]], [100 * r["test_acc"]], marker="*", s=120, color=color,
                       label=f"{kind.upper()} uniform soup")
        singles = rows_of(rows, "single", kind)
        ax.scatter([1] * len(singles), [100 * r["test_acc"] for r in singles], marker="x",
                   color=color, label=f"{kind.upper()} of each run")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("members")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Ensembles and soups {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swa_research.ensemble",
        description="The deep ensemble, the uniform soup and the greedy soup of a sweep's "
                    "finished runs, for their SGD weights and each average's.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--kinds", default="sgd,swa",
                        help="the weights combined: sgd and averages' names (default sgd,swa)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--no-wandb", action="store_true",
                        help="do not log to W&B even when the runs did")
    args = parser.parse_args(argv)
    try:
        if not args.sweep_dir.is_dir():
            raise UserError(f"{args.sweep_dir}: no such folder")
        if is_run_dir(args.sweep_dir):
            raise UserError(f"{args.sweep_dir} is one run's dir: ensembles combine the runs of "
                            "a sweep and are written beside them, never into a run; give the "
                            "sweep dir above it")
        run_dirs, refused, left = check_runs(find_run_dirs([args.sweep_dir]))
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        known = known_kinds(run_dirs)
        unknown = [k for k in kinds if k not in known]
        if unknown or not kinds:
            raise UserError(f"--kinds {args.kinds}: {', '.join(unknown) or 'none given'} is not "
                            f"a kind of weights these runs keep; expected some of "
                            f"{', '.join(known)}")
        for name, why in left:
            print(f"left out {name}: {why}", flush=True)
        if refused:
            print(f"note: {refused}", flush=True)
        device = resolve_device(args.device, "--device ")
        combiner = Combiner(run_dirs, device)
        rows = combine(combiner, run_dirs, kinds, refused)
        if not any(r["combination"] != LEFT_OUT for r in rows):
            raise UserError(f"none of the runs saved weights of {', '.join(kinds)} "
                            "(trainer.save_checkpoints=true writes them)")
        rows = [*({"combination": LEFT_OUT, "kind": "all", "runs": n, "note": w}
                  for n, w in left), *rows]
        rows = merged(args.sweep_dir / CSV_FILE, rows, kinds)
        write_csv(args.sweep_dir / CSV_FILE, rows)
        try:
            plot(rows, args.sweep_dir / PLOT_FILE, args.sweep_dir.name)
        except Exception as e:  # a plot is a convenience
            log.warning("could not write %s: %s", PLOT_FILE, e)
        if not args.no_wandb:
            targets = [t for d in run_dirs
                       if (t := load_run(d, args.sweep_dir).wandb) is not None]
            where = log_ensemble(targets, args.sweep_dir)
            if where:
                print(f"logged to W&B: {where}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.sweep_dir / CSV_FILE} and {PLOT_FILE}")
    return 0
