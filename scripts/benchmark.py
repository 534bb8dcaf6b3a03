"""Training throughput: the seed notebook's loop against this project's trainer, in one process,
on the same data, for VGG "simplified" and VGG16.

    python scripts/benchmark.py                          # both models, fp32 and bf16
    python scripts/benchmark.py --device cuda --precision bf16 --batch-size 512
    python scripts/benchmark.py --data-root /work/data/cifar10-jpeg --json speed.json
    python scripts/benchmark.py --ranks 1,2,4,8 --model wrn28x10   # DDP scaling (torchrun)
    python scripts/benchmark.py --task lm --device cuda --compile  # GPT tokens/s and MFU
                                                                   # (scripts/lm_benchmark.py)
    python scripts/benchmark.py --strategy fsdp --ranks 2  # an average beside a sharded GPT
                                                           # (scripts/fsdp_benchmark.py)

The seed's loop is written out below as the notebook ran it: a torchvision DataLoader with
``ToTensor()`` over a torchvision-style data set (one PIL image at a time, in the main
process), Adam, and an ``AveragedModel`` updated every 50 steps, in fp32 and NCHW. This
project's path is ``Trainer.train_epoch`` itself, on a trainer that ``swa_research.training.build``
makes from a config as a run does (``load_config``, ``build_trainer``): uint8 tensors in
memory, batched preprocessing (``train_batches`` and ``Preprocess``), ``TrainStep`` (autocast,
channels-last, optionally compiled) and the run's "swa" average, also every 50 steps.

The timed chunks of the two paths alternate, round after round, so that a neighbour on a
shared machine slows both alike; the table gives medians over the rounds.

Columns (``--json`` writes them under "rows", one object per row):
  model, path (seed | trainer), precision, batch_size,
  images_per_s        median over rounds, data loading included
  ratio_to_seed       images_per_s / the seed loop's, same model
  ms_per_step         1000 * batch_size / images_per_s
  avg_update_ms       one update of the average (the seed: AveragedModel.update_parameters,
                      the trainer: the "swa" average's update): --avg-calls updates queued
                      back to back, one sync at the end, as an EMA's updates between steps are
  avg_overhead_pct    avg_update_ms / ms_per_step * 100: the cost of averaging at every step
                      (EMA); at the seed's one update per 50 steps it is 1/50 of this
  peak_gpu_mb         torch.cuda.max_memory_allocated over this row's steps (null on CPU)
  peak_rss_mb         the process's peak RSS (getrusage) after this row's first steps; one
                      process runs every row, so it only grows down the table
  tflops              achieved: the model's nominal FLOPs per training step (FlopCounterMode
                      on one forward and backward pass) / time per step
  matmul_peak_tflops  the best of timed square matmuls in this run at the row's precision
  pct_of_peak         tflops / matmul_peak_tflops * 100
and, in the JSON only, images_per_s_rounds, others_cpu_pct_rounds (the CPU that other
processes used during each round, in % of all cores: a shared machine's noise) and
flops_per_step.

``--ranks 1,2,...`` measures DDP scaling instead: for each N, one training run of the trainer
(``python -m swa_research.train`` under ``torchrun --standalone --nproc-per-node N``, weak
scaling: ``--batch-size`` images per rank, so the global batch is N times that) of two epochs of
``--steps`` x ``--rounds`` steps each, without averaging, checkpoints or weights files; the
images/s are the run's own (``metrics.json``: images trained over training time, both epochs,
so the first steps' warm-up counts alike at every N). Columns: ranks, global_batch,
images_per_s, speedup (over the first N), efficiency (speedup / (N / first N)).

``--profile PATH`` then runs ``--profile-steps`` more steps of each trainer path under
torch.profiler and writes its op tables to PATH (sorted by GPU time on CUDA, by CPU time
elsewhere); the trainer rows of the JSON gain
  device_busy_ms_per_step  the time the GPU had work during a profiled step (the union of its
                           kernels' and copies' intervals; null off CUDA)
  device_busy_pct          that over ms_per_step: near 100 the step is bound by the GPU, far
                           below it the GPU waits for the host (a step bound by kernel
                           launches, which CUDA graphs remove)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_model, matmul_peak_tflops, sync, time_queued  # noqa: E402

from swa_research.averaging import PRIMARY
from swa_research.config import (
    CHOICES,
    Config,
    DataConfig,
    OptimizerConfig,
    SwaConfig,
    TrainerConfig,
    iterations_per_epoch,
)
from swa_research.data import (
    DataSplits,
    ImageSet,
    Preprocess,
    load_datasets,
    split_train_val,
    train_batches,
)
from swa_research.errors import UserError
from swa_research.fileio import atomic_write_text, probe_writable
from swa_research.models import MODELS, build_model, resolve_model_config
from swa_research.tracking.outputs import peak_gpu_mb, peak_rss_mb
from swa_research.training.build import build_trainer, config_dict_of, load_config, resolve_device
from swa_research.training.step import AUTOCAST_DTYPES, cpu_has_native

COLUMNS = ["model", "path", "precision", "batch_size", "images_per_s", "ratio_to_seed",
           "ms_per_step", "avg_update_ms", "avg_overhead_pct", "peak_gpu_mb", "peak_rss_mb",
           "tflops", "matmul_peak_tflops", "pct_of_peak"]
AVERAGE_EVERY = 50  # the seed's swa_freq
VAL_FRACTION = 0.1  # the seed's validation split, held out by both paths


class OtherLoad:
    """CPU used by other processes while a block runs, in % of all cores (Linux; None
    elsewhere): on a shared machine it says which timings a neighbour disturbed."""

    def __init__(self) -> None:
        self.pct: float | None = None

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        return busy, int(mine[11]) + int(mine[12])  # utime + stime

    def __enter__(self) -> OtherLoad:
        self._start = self._ticks()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._ticks()
        if self._start is None or end is None:
            return
        hz = os.sysconf("SC_CLK_TCK")
        seconds = time.perf_counter() - self._t0
        other = (end[0] - self._start[0]) - (end[1] - self._start[1])
        self.pct = max(0.0, 100 * other / hz / (seconds * (os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------
# Data


class PILImages(Dataset):
    """uint8 NCHW images served one PIL image at a time, as torchvision's CIFAR10 does
    (``Image.fromarray`` on an HWC array, then the transform)."""

    def __init__(self, images: ImageSet, transform: Callable[[Any], torch.Tensor]) -> None:
        self.hwc = images.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = images.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.hwc[i])), self.targets[i]


def data_config(args: argparse.Namespace) -> DataConfig:
    """The data of both paths as a run's config names it: the image folder, or synthetic
    CIFAR-size images (a test set of one image: the benchmark never evaluates)."""
    if args.data_root:
        return DataConfig(name="imagefolder", root=args.data_root, val_fraction=VAL_FRACTION)
    return DataConfig(name="synthetic", root="", num_classes=10, train_size=args.num_images,
                      test_size=1, val_fraction=VAL_FRACTION)


@dataclass
class BenchData:
    train: ImageSet  # the whole training set, uint8, on the CPU
    classes: list[str]
    seed_set: Dataset  # the same images as the seed's torchvision-style data set
    description: str

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])


def load_data(args: argparse.Namespace) -> BenchData:
    """The training images twice: as uint8 tensors (this project) and as a torchvision-style
    data set that decodes one image per item (the seed)."""
    from torchvision import datasets, transforms

    train, _, classes = load_datasets(data_config(args), num_workers=2)
    if args.data_root:
        seed_set = datasets.ImageFolder(str(Path(args.data_root) / "train"),
                                        transform=transforms.ToTensor())
        return BenchData(train, classes, seed_set,
                         f"{args.data_root} (ImageFolder, JPEG decoded per item)")
    return BenchData(train, classes, PILImages(train, transforms.ToTensor()),
                     f"synthetic, {args.num_images} uint8 CIFAR-size images in memory")


# ---------------------------------------------------------------------------------------------
# The two loops


class SeedLoop:
    """The notebook's training loop (fp32, NCHW, eager), resumable in chunks of steps."""

    def __init__(self, model: nn.Module, dataset: Dataset, batch_size: int,
                 device: torch.device) -> None:
        self.device = device
        self.model = model.to(device)
        n = len(dataset)  # type: ignore[arg-type]
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        split = int(0.1 * n)
        self.loader = DataLoader(dataset=dataset, batch_size=batch_size,
                                 sampler=SubsetRandomSampler(indices[split:]), drop_last=True)
        self.criterion = nn.CrossEntropyLoss().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.0001)
        self.swa_model = torch.optim.swa_utils.AveragedModel(self.model)
        self.total_batch = len(self.loader)
        self.avg_loss: torch.Tensor | float = 0
        self.iteration = 0
        self._batches = iter(self.loader)

    def run(self, steps: int) -> None:
        self.model.train()
        for _ in range(steps):
            try:
                X, Y = next(self._batches)
            except StopIteration:  # the next epoch
                self._batches = iter(self.loader)
                X, Y = next(self._batches)
            X = X.to(self.device)
            Y = Y.to(self.device)
            pred = self.model(X)
            loss = self.criterion(pred, Y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.avg_loss += loss / self.total_batch
            self.iteration += 1
            if self.iteration % AVERAGE_EVERY == 0:
                self.swa_model.update_parameters(self.model)
        sync(self.device)

    def update_average(self) -> None:
        self.swa_model.update_parameters(self.model)


def bench_config(args: argparse.Namespace, name: str, precision: str, device: torch.device,
                 iterations: int, iters_per_epoch: int) -> Config:
    """The config of a run whose training steps are the trainer path's: the benchmark's data and
    model, Adam at the seed's lr of 1e-4 throughout (swa.lr too), the "swa" average from the
    start every 50 iterations as the seed, and epochs enough for ``iterations`` steps (at
    least two averaging points: the budget check passes without a warning)."""
    needed = max(iterations, 2 * AVERAGE_EVERY)
    return load_config(Config(
        data=data_config(args),
        model=model_spec(name, args.width),
        optimizer=OptimizerConfig(name="adam", lr=1e-4),
        swa=SwaConfig(method="swa", lr=1e-4, start=0, freq=AVERAGE_EVERY, unit="iter"),
        trainer=TrainerConfig(
            epochs=math.ceil(needed / max(1, iters_per_epoch)), batch_size=args.batch_size,
            device=str(device), num_workers=2, precision=precision,
            channels_last=not args.no_channels_last, compile=args.compile is not None,
            compile_mode=args.compile or "default", progress="none"),
        seed=0))


class TrainerLoop:
    """``Trainer.train_epoch`` of the trainer that ``swa_research.training.build`` makes from
    ``config`` (its data, model, optimizer, schedule, averages, step), each chunk on a slice of
    ``steps * batch_size`` images of its training set, so that one epoch is one timed chunk;
    the average is updated every 50 iterations as in the seed."""

    def __init__(self, config: Config, device: torch.device, run_dir: Path) -> None:
        self.trainer = build_trainer(config, config_dict_of(config), run_dir, device)
        self.model = self.trainer.model
        self.average = self.trainer.averages[PRIMARY]
        self.train_set = self.trainer.data.train
        self.batch_size = config.trainer.batch_size
        self.offset = 0

    def run(self, steps: int) -> None:
        n = steps * self.batch_size
        if self.offset + n > len(self.train_set):
            self.offset = 0
        index = torch.arange(self.offset, self.offset + n) % len(self.train_set)
        self.offset += n
        train = self.train_set.subset(index)
        self.trainer.data = DataSplits(train, None, train, self.trainer.data.classes)
        self.trainer.train_epoch(1)  # ends by reading its sums: the device has finished

    def update_average(self) -> None:
        self.average.update(self.model)


# ---------------------------------------------------------------------------------------------
# Measurements


def busy_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: how long a device had work, however
    its streams overlapped."""
    busy = 0.0
    start = end = None
    for s, e in sorted(spans):
        if end is None or s > end:
            if start is not None and end is not None:
                busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    if start is not None and end is not None:
        busy += end - start
    return busy


def profile_trainer(loop: TrainerLoop, steps: int, device: torch.device
                    ) -> tuple[str, float | None]:
    """torch.profiler over ``steps`` steps of a trainer path: the op table, and the time per
    step that the GPU had work (None off CUDA)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        loop.run(steps)
        sync(device)
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == DeviceType.CUDA]
    busy_ms = busy_us(spans) / 1000 / steps if spans else None
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=30), busy_ms


def step_flops(model_dict: dict[str, Any], num_classes: int, image_size: int, batch_size: int,
               device: torch.device) -> int:
    """Nominal FLOPs of one forward and backward pass of the model (a 3x3 convolution counts
    2 * 9 * C_in * C_out per output pixel; the optimizer's elementwise work not counted)."""
    model = build_model(model_dict, num_classes, image_size).to(device)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return int(counter.get_total_flops())


def loader_images_per_s(batches: Callable[[], Any], device: torch.device, count: int,
                        batch_size: int) -> float:
    """Images per second of a data path alone (a fresh epoch whenever one ends), moved to the
    device."""

    def endless() -> Any:
        while True:
            yield from batches()

    it = endless()
    next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(count):
        x, _ = next(it)
        x.to(device)
    sync(device)
    return count * batch_size / (time.perf_counter() - t0)


def benchmark_model(name: str, args: argparse.Namespace, device: torch.device,
                    data: BenchData, precisions: list[str], peaks: dict[str, float],
                    run_dir: Path, profiles: list[str]) -> list[dict[str, Any]]:
    """The rows of one model; with ``--profile``, each trainer path's op table is appended to
    ``profiles``."""
    model_dict = resolve_model_config(model_spec(name, args.width))
    num_classes, size = len(data.classes), data.image_size
    torch.manual_seed(0)
    paths: dict[tuple[str, str], Any] = {
        ("seed", "fp32"): SeedLoop(build_model(model_dict, num_classes, size), data.seed_set,
                                   args.batch_size, device)}
    # The trainer's training set is what the config's validation split (seed 0) leaves.
    train_size = len(split_train_val(data.train, VAL_FRACTION, 0)[0])
    ipe = iterations_per_epoch(train_size, args.batch_size, drop_last=True)
    iterations = args.warmup + args.rounds * args.steps + (args.profile_steps
                                                           if args.profile else 0)
    for p in precisions:
        config = bench_config(args, name, p, device, iterations, ipe)
        paths[("trainer", p)] = TrainerLoop(config, device, run_dir)
    runs: dict[tuple[str, str], list[float]] = {k: [] for k in paths}
    others: dict[tuple[str, str], list[float]] = {k: [] for k in paths}
    gpu: dict[tuple[str, str], float | None] = {k: None for k in paths}
    rss: dict[tuple[str, str], float] = {}
    for key, loop in paths.items():  # warm-up: allocations, oneDNN/cuDNN plans, compiling
        loop.run(args.warmup)
        rss[key] = peak_rss_mb()
    for r in range(args.rounds):
        for key, loop in paths.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with OtherLoad() as load:
                t0 = time.perf_counter()
                loop.run(args.steps)
                seconds = time.perf_counter() - t0
            runs[key].append(args.steps * args.batch_size / seconds)
            if load.pct is not None:
                others[key].append(load.pct)
            if device.type == "cuda":
                gpu[key] = max(gpu[key] or 0.0, peak_gpu_mb(device) or 0.0)
            print(f"  {name} round {r + 1}/{args.rounds} {key[0]} {key[1]}: "
                  f"{runs[key][-1]:.0f} images/s (other processes: "
                  f"{load.pct if load.pct is not None else float('nan'):.0f}% CPU)",
                  file=sys.stderr, flush=True)
    flops = step_flops(model_dict, num_classes, size, args.batch_size, device)
    rows = []
    seed_ips = statistics.median(runs[("seed", "fp32")])
    for key, loop in paths.items():
        ips = statistics.median(runs[key])
        ms = 1000 * args.batch_size / ips
        update_ms = 1000 * time_queued(loop.update_average, device, calls=args.avg_calls)
        tflops = flops / (ms / 1000) / 1e12
        peak = peaks.get(key[1])
        rows.append({
            "model": name, "path": key[0], "precision": key[1], "batch_size": args.batch_size,
            "images_per_s": round(ips, 1), "ratio_to_seed": round(ips / seed_ips, 3),
            "ms_per_step": round(ms, 2), "avg_update_ms": round(update_ms, 3),
            "avg_overhead_pct": round(100 * update_ms / ms, 3),
            "peak_gpu_mb": None if gpu[key] is None else round(gpu[key], 1),
            "peak_rss_mb": round(rss[key], 1), "tflops": round(tflops, 4),
            "matmul_peak_tflops": None if peak is None else round(peak, 4),
            "pct_of_peak": None if not peak else round(100 * tflops / peak, 1),
            "images_per_s_rounds": [round(v, 1) for v in runs[key]],
            "others_cpu_pct_rounds": [round(v, 1) for v in others[key]],
            "flops_per_step": flops,
        })
        if args.profile and key[0] == "trainer":
            try:
                table, busy_ms = profile_trainer(loop, args.profile_steps, device)
            except Exception as e:  # a diagnostic: it must not cost the measurements above
                table, busy_ms = f"profiling failed: {type(e).__name__}: {e}", None
                print(f"{name} {key[1]}: {table}", file=sys.stderr)
            pct = None if busy_ms is None else 100 * busy_ms / ms
            rows[-1]["device_busy_ms_per_step"] = None if busy_ms is None else round(busy_ms, 3)
            rows[-1]["device_busy_pct"] = None if pct is None else round(pct, 1)
            busy = "-" if busy_ms is None else f"{busy_ms:.3f} ms ({pct:.0f}%)"
            profiles.append(f"## {name} {key[0]} {key[1]}, batch {args.batch_size}: "
                            f"{ms:.3f} ms per step timed, device busy per profiled step "
                            f"{busy}\n\n{table}\n")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "path", "prec", "img/s", "x seed", "ms/step", "avg ms", "avg %",
            "GPU MB", "RSS MB", "TFLOP/s", "peak", "% peak"]
    keys = ["model", "path", "precision", "images_per_s", "ratio_to_seed", "ms_per_step",
            "avg_update_ms", "avg_overhead_pct", "peak_gpu_mb", "peak_rss_mb", "tflops",
            "matmul_peak_tflops", "pct_of_peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for k in keys:
            v = row[k]
            if v is None:
                cells.append("-")
            elif k == "images_per_s":
                cells.append(f"{v:.0f}")
            elif k in ("tflops", "matmul_peak_tflops"):
                cells.append(f"{v:.3f}")
            elif k == "ratio_to_seed":
                cells.append(f"{v:.2f}")
            elif isinstance(v, float):
                cells.append(f"{v:.1f}" if v >= 10 else f"{v:.2f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_spec(name: str, width: float) -> dict[str, Any]:
    """The model config for ``name``: ``--width`` goes to the models that take a width (the
    VGGs); the others are built as registered."""
    from swa_research.models import MODELS, model_options

    if name in MODELS and "width" in model_options(name):
        return {"name": name, "width": width}
    return {"name": name}


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    """images/s of the same training run on each number of ranks in ``args.ranks``."""
    rows: list[dict[str, Any]] = []
    name = args.models[0]
    prec = args.precisions[0]
    for n in args.ranks:
        batch = args.batch_size * n
        data = (["data=imagefolder", f"data.root={args.data_root}"] if args.data_root else
                ["data=synthetic", f"data.train_size={batch * args.steps * args.rounds}",
                 "data.test_size=256", "data.val_fraction=0"])
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={n}", "-m", "swa_research.train", f"model={name}",
                       *data, "swa=none", f"trainer.batch_size={batch}", "trainer.epochs=2",
                       "trainer.eval_every=2", "trainer.checkpoint_every=0",
                       "trainer.save_checkpoints=false", "trainer.progress=none",
                       f"trainer.device={args.device}", f"trainer.precision={prec}",
                       f"trainer.compile={args.compile is not None}",
                       f"trainer.channels_last={not args.no_channels_last}",
                       f"hydra.run.dir={tmp}/run"]
            if "width" in model_spec(name, args.width):
                command.append(f"model.width={args.width}")
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f"{n} ranks: the run failed (exit {done.returncode}): "
                                f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
            metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        ips = metrics["train"]["images_per_s"]
        rows.append({"ranks": n, "global_batch": batch, "images_per_s": round(ips, 1)})
        print(f"{n} rank(s): {ips:.0f} images/s (global batch {batch})", flush=True)
    base = rows[0]
    for row in rows:
        row["speedup"] = round(row["images_per_s"] / base["images_per_s"], 3)
        row["efficiency"] = round(row["speedup"] / (row["ranks"] / base["ranks"]), 3)
    header = "| ranks | global batch | images/s | speedup | efficiency |"
    lines = [header, "| --- | --- | --- | --- | --- |"] + [
        f"| {r['ranks']} | {r['global_batch']} | {r['images_per_s']:.0f} | {r['speedup']:.2f} "
        f"| {100 * r['efficiency']:.0f}% |" for r in rows]
    print(f"DDP scaling: {name}, {prec}, {args.batch_size} images per rank, device "
          f"{args.device}\n" + "\n".join(lines))
    return {"scaling": rows, "setup": {"model": name, "precision": prec,
                                       "batch_per_rank": args.batch_size,
                                       "steps_per_epoch": args.steps * args.rounds,
                                       "device": args.device, "torch": torch.__version__}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--model", default="simplified,vgg16",
                   help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--precision", default=None,
                   help="comma-separated precisions of the trainer path: fp32, bf16, fp16 "
                        "(default: fp32,bf16 on CUDA and on CPUs with native bf16, else fp32)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per path and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the table gives medians")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per path first")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=float, default=1.0, help="model.width (channel multiplier)")
    p.add_argument("--data-root", default=None,
                   help="an image folder (train/<class>/*.jpg); default: synthetic images")
    p.add_argument("--num-images", type=int, default=5000, help="synthetic images")
    p.add_argument("--no-channels-last", action="store_true", help="trainer path in NCHW")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=CHOICES["trainer.compile_mode"], metavar="MODE",
                   help="torch.compile the trainer's model, in MODE (default; reduce-overhead "
                        "for CUDA graphs, max-autotune, max-autotune-no-cudagraphs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--matmul-size", type=int, default=0,
                   help="n of the n x n matmul that measures the peak (0: 4096 on CUDA, "
                        "2048 on CPU)")
    p.add_argument("--avg-calls", type=int, default=10,
                   help="timed updates of the average (queued back to back)")
    p.add_argument("--loader-batches", type=int, default=20,
                   help="batches timed for the data paths alone")
    p.add_argument("--json", default=None, help="write the table and the setup to this file")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="profile each trainer path afterwards (torch.profiler) and write the op "
                        "tables to PATH; the JSON gains the GPU's busy time per step")
    p.add_argument("--profile-steps", type=int, default=5, help="steps profiled per path")
    p.add_argument("--ranks", default=None,
                   help="comma-separated numbers of DDP ranks: measure scaling (torchrun) "
                        "instead; the first model and precision")
    args = p.parse_args(argv)
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    except ValueError:
        p.error(f"--ranks {args.ranks}: expected comma-separated whole numbers, e.g. 1,2,4")
    if args.ranks is not None and min(args.ranks) < 1:
        p.error("--ranks: every number of ranks must be at least 1")
    for key in ("steps", "rounds", "batch_size", "num_images", "avg_calls", "loader_batches",
                "profile_steps"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.data_root is None and args.num_images - int(0.1 * args.num_images) < args.batch_size:
        p.error(f"--num-images {args.num_images} leaves the seed loop (90% of them, drop_last) "
                f"no batch of {args.batch_size}")
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    for name in args.models:  # an unknown model or a bad width, before minutes of measuring
        try:
            resolve_model_config(model_spec(name, args.width))
        except UserError as e:
            p.error(str(e))
    if args.precision is None:
        cuda = args.device.startswith("cuda") or (args.device == "auto"
                                                  and torch.cuda.is_available())
        args.precision = "fp32,bf16" if cuda or cpu_has_native("bf16") else "fp32"
        if args.precision == "fp32":
            print("this CPU has no native bf16 (AMX, AVX512-BF16): emulated bf16 runs at about "
                  "1% of fp32's speed, so only fp32 is measured (--precision fp32,bf16 to "
                  "insist)", file=sys.stderr)
    args.precisions = [m.strip() for m in args.precision.split(",") if m.strip()]
    for prec in args.precisions:
        if prec not in AUTOCAST_DTYPES:
            p.error(f"--precision {prec}: expected fp32, bf16 or fp16")
    for option, path in (("--json", args.json), ("--profile", args.profile)):
        if path:  # before minutes of measuring, not after
            folder = Path(path).expanduser().resolve().parent
            try:
                probe_writable(folder)
            except OSError as e:
                p.error(f"{option} {path}: cannot write in {folder} ({e.strerror or e})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=("classification", "lm"), default="classification")
    task.add_argument("--strategy", choices=("fsdp",), default=None)
    known, rest = task.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.strategy == "fsdp":  # FSDP against DDP on torchrun: its own options
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from fsdp_benchmark import main as fsdp_main

        return fsdp_main(rest)
    if known.task == "lm":  # language models: scripts/lm_benchmark.py, its own options
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from lm_benchmark import main as lm_main

        return lm_main(rest)
    args = parse_args(rest)
    if args.ranks:
        result = scaling(args)
        if args.json:
            atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n = args.matmul_size or (4096 if device.type == "cuda" else 2048)
    data = load_data(args)
    peaks = {p: matmul_peak_tflops(device, AUTOCAST_DTYPES[p] or torch.float32, n)
             for p in sorted({"fp32", *args.precisions})}
    bs = args.batch_size
    pre = Preprocess(False, [0.5] * 3, [0.5] * 3, device)
    on_device = data.train.to(device)
    gen = torch.Generator().manual_seed(0)
    loaders = {
        "seed": loader_images_per_s(
            lambda: DataLoader(data.seed_set, batch_size=bs, shuffle=True, drop_last=True),
            device,
            args.loader_batches, bs),
        "trainer": loader_images_per_s(
            lambda: train_batches(on_device, bs, gen, pre), device, args.loader_batches, bs),
    }
    rows: list[dict[str, Any]] = []
    profiles: list[str] = []
    with tempfile.TemporaryDirectory() as run_dir:
        for name in args.models:
            rows += benchmark_model(name, args, device, data, args.precisions, peaks,
                                    Path(run_dir), profiles)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    result = {
        "machine": {"device": str(device), "device_name": device_name, "cpu": cpu_model(),
                    "native_bf16": torch.cuda.is_bf16_supported() if device.type == "cuda"
                    else cpu_has_native("bf16"),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "setup": {"data": data.description, "batch_size": bs, "width": args.width,
                  "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                  "channels_last": not args.no_channels_last, "compile": args.compile,
                  "average_every": AVERAGE_EVERY, "matmul_size": n},
        "matmul_peak_tflops": {k: round(v, 4) for k, v in peaks.items()},
        "loader_images_per_s": {k: round(v, 1) for k, v in loaders.items()},
        "columns": COLUMNS,
        "rows": rows,
    }
    print(f"{device_name} ({device}, {torch.get_num_threads()} threads), {data.description}"
          f"; batch {bs}, width {args.width}, median of {args.rounds} rounds of {args.steps} "
          "steps")
    print("matmul peak (TFLOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in peaks.items()))
    print("data path alone (images/s): " + ", ".join(f"{k} {v:.0f}"
                                                     for k, v in loaders.items()))
    print(format_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.profile:
        atomic_write_text(args.profile, f"torch.profiler, {args.profile_steps} steps per trainer "
                          f"path, {device_name} ({device}), torch {torch.__version__}\n\n"
                          + "\n".join(profiles))
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad data folder, no GPU for --device cuda: one line
        sys.exit(f"benchmark.py: {e}")
