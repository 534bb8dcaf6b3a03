"""How far each CPU convolution path moves a training gradient, next to SGD's own noise.

    python scripts/conv_fidelity.py                                   # synthetic data, VGG16-BN
    python scripts/conv_fidelity.py --data-root /work/data/cifar10-jpeg --width 0.5
    python scripts/conv_fidelity.py --checkpoint outputs/.../checkpoint.pt --json fid.json

For each of ``--batches`` training batches it computes the gradient of the cross-entropy loss
(all parameters, BN in training mode, dropout off so that every path sees the same network) in
float64 with direct convolutions, the reference, and under each path below, then reports:

  rel_err       median over batches of ||g - g64|| / ||g64||: the path's rounding error
  cos           median cosine between g and g64
  bias_ratio    ||mean_b(g - g64)|| / mean_b ||g - g64||: about 1/sqrt(batches) for errors that
                average out over steps, 1 for an error that pushes every step the same way
  err_to_noise  rel_err / sgd_noise
  loss_err      median |loss - loss64| / loss64

and sgd_noise, the median of ||g64_b - mean_b g64|| / ||mean_b g64||: how far one batch's
gradient already is from the average over the batches. Paths:

  native_nhwc   oneDNN, channels-last, fp32 (trainer.conv_algorithm=native, the default layout)
  native_nchw   oneDNN, NCHW, fp32: the same arithmetic in another order (a rounding control)
  auto_nhwc     trainer.conv_algorithm=auto in fp32: Winograd on the deep layers
  winograd      trainer.conv_algorithm=winograd in fp32: Winograd wherever a tile divides the map
  bf16_native   autocast bf16, oneDNN
  bf16_auto     autocast bf16, trainer.conv_algorithm=auto (im2col + GEMM on the deep layers)

The weights are a fresh initialisation (``--seed``) or a training checkpoint's
(``--checkpoint``: its model config is used).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from swa_research.checkpoint import CorruptCheckpoint, load_checkpoint
from swa_research.config import DataConfig, ModelConfig
from swa_research.conv import set_conv_algorithm
from swa_research.data import load_datasets, synthetic_images
from swa_research.fileio import atomic_write_text
from swa_research.models import build_model
from swa_research.step import autocast

PATHS: dict[str, dict[str, Any]] = {
    "native_nhwc": dict(algo="native", channels_last=True, bf16=False),
    "native_nchw": dict(algo="native", channels_last=False, bf16=False),
    "auto_nhwc": dict(algo="auto", channels_last=True, bf16=False),
    "winograd": dict(algo="winograd", channels_last=True, bf16=False),
    "bf16_native": dict(algo="native", channels_last=True, bf16=True),
    "bf16_auto": dict(algo="auto", channels_last=True, bf16=True),
}


def gradient(model: nn.Module, x: Tensor, y: Tensor, bf16: bool) -> tuple[Tensor, float]:
    """The flattened gradient of the mean cross-entropy over every parameter, and the loss."""
    model.zero_grad(set_to_none=True)
    with autocast("bf16" if bf16 else "fp32", torch.device("cpu")):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad.reshape(-1).double() for p in model.parameters()]
    return torch.cat(grads), float(loss.detach())


def measure(model: nn.Module, batches: list[tuple[Tensor, Tensor]],
            paths: list[str]) -> dict[str, Any]:
    model = model.train()
    reference = copy.deepcopy(model).double()
    set_conv_algorithm(reference, "native")
    ref = [gradient(reference, x.double(), y, False) for x, y in batches]
    g64 = torch.stack([g for g, _ in ref])
    mean64 = g64.mean(0)
    noise = [float((g - mean64).norm() / mean64.norm()) for g in g64]
    out: dict[str, Any] = {"sgd_noise": statistics.median(noise), "paths": {}}
    for name in paths:
        spec = PATHS[name]
        m = copy.deepcopy(model).float()
        set_conv_algorithm(m, spec["algo"])
        fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
        m = m.to(memory_format=fmt)
        errs, coss, loss_errs, diffs = [], [], [], []
        for (x, y), (g_ref, loss_ref) in zip(batches, ref, strict=True):
            g, loss = gradient(m, x.contiguous(memory_format=fmt), y, spec["bf16"])
            diffs.append(g - g_ref)
            errs.append(float((g - g_ref).norm() / g_ref.norm()))
            coss.append(float(F.cosine_similarity(g, g_ref, dim=0)))
            loss_errs.append(abs(loss - loss_ref) / abs(loss_ref))
        d = torch.stack(diffs)
        rel_err = statistics.median(errs)
        out["paths"][name] = {
            "rel_err": rel_err,
            "cos": statistics.median(coss),
            "bias_ratio": float(d.mean(0).norm() / d.norm(dim=1).mean()),
            "err_to_noise": rel_err / out["sgd_noise"],
            "loss_err": statistics.median(loss_errs),
        }
    return out


def load_batches(args: argparse.Namespace) -> list[tuple[Tensor, Tensor]]:
    if args.data_root:
        train, _, _ = load_datasets(DataConfig(name="imagefolder", root=args.data_root))
    else:
        train = synthetic_images(args.batch_size * args.batches, 10, 32, seed=args.seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    batches = []
    for i in range(args.batches):
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        batches.append((train.images[idx].float() / 255.0, train.labels[idx]))
    return batches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="an ImageFolder copy of CIFAR (default: synthetic data)")
    p.add_argument("--model", default="vgg16")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--no-batch-norm", action="store_true")
    p.add_argument("--checkpoint", help="a training checkpoint whose weights to use")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated, from: "
                   + ", ".join(PATHS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    paths = [s for s in args.paths.split(",") if s]
    unknown = [s for s in paths if s not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {', '.join(unknown)}; expected some of {', '.join(PATHS)}")
    if args.batches < 2 or args.batch_size < 2:
        p.error("--batches and --batch-size must be at least 2")

    torch.manual_seed(args.seed)
    model_cfg = ModelConfig(name=args.model, batch_norm=not args.no_batch_norm, dropout=0.0,
                            width=args.width)
    state = None
    if args.checkpoint:
        try:
            state = load_checkpoint(args.checkpoint)
        except (CorruptCheckpoint, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        saved = state["config"]["model"]
        model_cfg = ModelConfig(name=saved["name"], batch_norm=saved["batch_norm"],
                                dropout=0.0, width=saved["width"])
    try:
        batches = load_batches(args)
    except Exception as e:  # a missing or unreadable data folder
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = _classes(state) if state is not None else 10
    model = build_model(model_cfg, num_classes=classes)
    if state is not None:
        model.load_state_dict(state["model"])
    result = measure(model, batches, paths)
    result.update(model=model_cfg.__dict__, batch_size=args.batch_size, batches=args.batches,
                  weights=args.checkpoint or f"init seed {args.seed}",
                  data=args.data_root or "synthetic", threads=torch.get_num_threads())
    print(f"{model_cfg.name} width {model_cfg.width}, batch {args.batch_size} x "
          f"{args.batches}, weights: {result['weights']}; SGD noise (one batch against the "
          f"mean): {result['sgd_noise']:.3f}")
    print(f"{'path':<12} {'rel_err':>9} {'1-cos':>9} {'bias_ratio':>10} {'err/noise':>9} "
          f"{'loss_err':>9}")
    for name, r in result["paths"].items():
        print(f"{name:<12} {r['rel_err']:9.2e} {1 - r['cos']:9.1e} {r['bias_ratio']:10.2f} "
              f"{r['err_to_noise']:9.1e} {r['loss_err']:9.1e}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return 0


def _classes(state: dict[str, Any]) -> int:
    """The number of classes of a checkpoint's model: its last layer's output size."""
    last = [v for k, v in state["model"].items() if k.endswith(".weight") and v.dim() == 2]
    return int(last[-1].shape[0])


if __name__ == "__main__":
    sys.exit(main())
