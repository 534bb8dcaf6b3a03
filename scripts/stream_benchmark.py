"""Images/s and peak memory of the streaming data path (swa_research.data.streaming) against the
in-memory path's decode + iteration (swa_research.data), on the same image folder split.

Each measurement runs in a fresh process, so that its peak RSS is its own:

- ``in_memory``: decode every file (PIL, ``trainer.num_workers``-style threads, as
  ``data._decode_split``) into one uint8 tensor, then one epoch of ``data.train_batches``
  (pad-4 crop + flip, normalised floats). images/s = images / (decode + epoch); the epoch alone
  is reported too (later epochs cost only that).
- ``stream wN``: one epoch of ``StreamingSet.train_batches`` with N worker processes
  (``--augment``: none = the evaluation transform, an identity on images already
  ``--image-size`` square; random_resized_crop; crop_flip), and its loader wait.

Peak RSS: the process's ``ru_maxrss``; with workers, also the largest worker's
(``RUSAGE_CHILDREN``); their sum bounds the whole. Run it where the data is::

    python scripts/stream_benchmark.py --root /tmp/cifar/cifar10-jpeg --split test --workers 0,1,2

``--json PATH`` writes the rows. Nothing is written next to the data.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def child(args: argparse.Namespace) -> dict[str, object]:
    import torch

    torch.set_num_threads(args.threads)
    from swa_research.data.folders import _list_folder

    split_dir = Path(args.root) / args.split
    files, labels, classes = _list_folder(split_dir, None)
    if args.limit:
        pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
        pick = sorted(pick[:args.limit].tolist())
        files, labels = [files[i] for i in pick], [labels[i] for i in pick]
    n = len(files)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    row: dict[str, object] = {"path": args.mode, "images": n}
    t0 = time.perf_counter()
    if args.mode == "in_memory":
        from swa_research.data import Preprocess, train_batches
        from swa_research.data.folders import _decode_split
        from swa_research.data.transforms import ImageTransform, infer_image_size

        transform = ImageTransform(image_size=infer_image_size(files[0]))
        data = _decode_split(files, labels, split_dir, transform, args.decode_threads)
        t1 = time.perf_counter()
        pre = Preprocess(True, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                         torch.device("cpu"), augment="crop_flip")
        gen = torch.Generator().manual_seed(2)
        seen = 0
        for x, _ in train_batches(data, args.batch_size, gen, pre, drop_last=False, order=order):
            seen += x.shape[0]
        t2 = time.perf_counter()
        row.update(decode_s=t1 - t0, epoch_s=t2 - t1, images_per_s=seen / (t2 - t0),
                   epoch_images_per_s=seen / (t2 - t1), workers=None,
                   decode_threads=args.decode_threads)
    else:
        from swa_research.data.streaming import StreamingSet

        s = StreamingSet(files, labels, classes, image_size=args.image_size,
                         augment=args.augment, num_workers=args.workers,
                         prefetch_factor=args.prefetch)
        batches = s.train_batches(args.batch_size, order, drop_last=False, aug_seed=3)
        seen = 0
        for x, _ in batches:
            seen += x.shape[0]
        t2 = time.perf_counter()
        row.update(epoch_s=t2 - t0, images_per_s=seen / (t2 - t0), workers=args.workers,
                   augment=args.augment, loader_wait_s=batches.wait_s,
                   loader_wait_pct=100 * batches.wait_fraction)
        s.close()
        del batches
    row["peak_rss_mib"] = _peak_mib(resource.RUSAGE_SELF)
    row["peak_worker_rss_mib"] = _peak_mib(resource.RUSAGE_CHILDREN) if args.workers else 0.0
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/cifar/cifar10-jpeg")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=0, help="a seeded subset of this many images")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--augment", default="none",
                   choices=["none", "crop_flip", "random_resized_crop"])
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    p.add_argument("--json", default=None)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:  # a measurement, in its own process
        if args.mode == "stream":
            args.workers = int(args.workers)
        else:
            args.workers = 0
        print(json.dumps(child(args)))
        return
    rows = []
    runs = [["--mode", "in_memory"]] + [["--mode", "stream", "--workers", w]
                                        for w in args.workers.split(",")]
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    for extra in runs:
        cmd = [sys.executable, __file__, *base, *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = ("| path | workers | images | images/s | epoch-only images/s | loader wait | "
              "peak RSS MiB (main + largest worker) |")
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; "
          f"split {args.split}, image size {args.image_size}, batch {args.batch_size}, "
          f"augment (streaming) {args.augment}")
    print(header)
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        wait = f"{r['loader_wait_pct']:.0f}%" if "loader_wait_pct" in r else "-"
        epoch_only = (f"{r['epoch_images_per_s']:.0f}" if "epoch_images_per_s" in r else "-")
        who = r["path"] if r["path"] == "in_memory" else "streaming"
        workers = (f"{r['decode_threads']} decode threads" if r["path"] == "in_memory"
                   else r["workers"])
        print(f"| {who} | {workers} | {r['images']} | {r['images_per_s']:.0f} | {epoch_only} "
              f"| {wait} | {r['peak_rss_mib']:.0f} + {r['peak_worker_rss_mib']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
