"""The speed targets of issue 4, checked against what ``scripts/benchmark.py --json`` and a run's
``metrics.json`` measured:

    python scripts/targets.py bench.json [more.json ...] [run_dir/metrics.json] [--strict]
    python scripts/targets.py gpu_check_out/        # every JSON file in a folder

CUDA (the H100 targets):
  * simplified, bf16, batch 128: >= 20x the seed loop's images/s (eager or compiled);
  * VGG16, bf16, batch 512: >= 30% of the bf16 matmul peak measured in the same run;
  * averaging (one update, i.e. an EMA at every step): < 2% of a training step.
CPU:
  * trainer fp32: >= 1.25x the seed loop; bf16 >= 2x where the CPU has native bf16;
  * >= 80% of the fp32 matmul peak measured in the same run (the model's nominal FLOPs);
  * a full run's peak RSS (``train.peak_rss_mb`` of a metrics.json) under 3 GB.

Prints one Markdown row per check: the target, where it was measured, the figure, the threshold
and ``met`` / ``NOT met``; targets that none of the files measured are listed as not measured.
With ``--strict`` the exit status is 1 when a measured target is not met.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB_MIB = 1e9 / 2**20  # 3 GB (decimal) in MiB: the RSS threshold errs on the strict side

# The targets, as the table names them.
CUDA_SPEEDUP = "CUDA: simplified bf16 >= 20x the seed loop"
CUDA_PEAK = "CUDA: VGG16 bf16 batch 512 >= 30% of the bf16 matmul peak"
CUDA_AVERAGING = "CUDA: averaging < 2% of a step"
CPU_SPEEDUP = "CPU: fp32 >= 1.25x the seed loop"
CPU_PEAK = "CPU: >= 80% of the fp32 matmul peak"
CPU_BF16 = "CPU: bf16 >= 2x the seed loop (native bf16)"
RUN_RSS = "full run: peak RSS < 3 GB"


@dataclass
class Check:
    target: str
    where: str
    value: float
    threshold: float
    at_least: bool  # True: value >= threshold meets it; False: value < threshold
    unit: str = ""
    note: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.threshold if self.at_least else self.value < self.threshold

    def row(self) -> str:
        op = ">=" if self.at_least else "<"
        verdict = "met" if self.met else "**NOT met**"
        note = f" ({self.note})" if self.note else ""
        return (f"| {self.target} | {self.where} | {self.value:g}{self.unit}{note} | "
                f"{op} {self.threshold:g}{self.unit} | {verdict} |")


def _where(doc: dict[str, Any], row: dict[str, Any] | None = None) -> str:
    machine, setup = doc.get("machine", {}), doc.get("setup", {})
    parts = [str(machine.get("device_name") or machine.get("device") or "?")]
    if row is not None:
        parts.append(f"{row['model']} {row['precision']} batch {row['batch_size']}")
    if setup.get("compile"):
        parts.append(f"compile {setup['compile']}")
    if setup.get("width", 1.0) != 1.0:
        parts.append(f"width {setup['width']}")
    return ", ".join(parts)


def benchmark_checks(doc: dict[str, Any]) -> list[Check]:
    """The checks that one benchmark JSON measures."""
    device = str(doc.get("machine", {}).get("device", ""))
    cuda = device.startswith("cuda")
    checks: list[Check] = []
    for r in doc.get("rows", []):
        if r.get("path") != "trainer":
            continue
        where = _where(doc, r)
        model, prec, bs = r["model"], r["precision"], r["batch_size"]
        if cuda:
            if model == "simplified" and prec == "bf16" and bs == 128:
                checks.append(Check(CUDA_SPEEDUP, where, r["ratio_to_seed"], 20, True, "x",
                                    f"{r['images_per_s']:.0f} images/s"))
            if model == "vgg16" and prec == "bf16" and bs == 512 and r.get("pct_of_peak"):
                checks.append(Check(CUDA_PEAK, where, r["pct_of_peak"], 30, True, "%",
                                    f"{r['tflops']} of {r['matmul_peak_tflops']} TFLOP/s"))
            checks.append(Check(CUDA_AVERAGING, where, r["avg_overhead_pct"], 2, False, "%"))
            continue
        if prec == "fp32":
            checks.append(Check(CPU_SPEEDUP, where, r["ratio_to_seed"], 1.25, True, "x"))
            if r.get("pct_of_peak") is not None:
                checks.append(Check(CPU_PEAK, where, r["pct_of_peak"], 80, True, "%"))
        elif prec == "bf16" and doc.get("machine", {}).get("native_bf16", True):
            checks.append(Check(CPU_BF16, where, r["ratio_to_seed"], 2, True, "x"))
    return checks


def metrics_checks(doc: dict[str, Any], name: str) -> list[Check]:
    """The peak-RSS check of a run's metrics.json (runs that record it)."""
    rss = (doc.get("train") or {}).get("peak_rss_mb")
    if rss is None:
        return []
    return [Check(RUN_RSS, name, rss, round(3 * GB_MIB), False, " MiB")]


# What the "not measured" line lists (the bf16 CPU target applies only where bf16 is native).
EXPECTED = [CUDA_SPEEDUP, CUDA_PEAK, CUDA_AVERAGING, CPU_SPEEDUP, CPU_PEAK, RUN_RSS]


def collect(paths: list[Path]) -> list[Check]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    checks: list[Check] = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: not a readable JSON file ({e})") from e
        if not isinstance(doc, dict):
            continue
        if "rows" in doc:
            checks += benchmark_checks(doc)
        elif "train" in doc:
            checks += metrics_checks(doc, f"{f.parent.name}/{f.name}")
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path,
                   help="benchmark JSON files, metrics.json files, or folders holding them")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when a measured target is not met")
    args = p.parse_args(argv)
    try:
        checks = collect(args.paths)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print("| target | measured on | figure | threshold | verdict |\n|---|---|---|---|---|")
    for c in checks:
        print(c.row())
    seen = {c.target for c in checks}
    missing = [t for t in EXPECTED if t not in seen]
    if missing:
        print("not measured by these files: " + "; ".join(missing))
    failed = [c for c in checks if not c.met]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks met")
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
