"""scripts/targets.py: the speed targets judged from benchmark and run JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_speed import load_script

targets = load_script("targets")


def row(model: str, path: str, prec: str, bs: int = 128, **values: Any) -> dict[str, Any]:
    base = {"model": model, "path": path, "precision": prec, "batch_size": bs,
            "images_per_s": 1000.0, "ratio_to_seed": 1.0, "avg_overhead_pct": 0.5,
            "tflops": 0.1, "matmul_peak_tflops": 0.2, "pct_of_peak": 50.0}
    return {**base, **values}


def bench(device: str, rows: list[dict[str, Any]], native_bf16: bool = True,
          compile: str | None = None) -> dict[str, Any]:
    return {"machine": {"device": device, "device_name": "Some " + device.upper(),
                        "native_bf16": native_bf16},
            "setup": {"width": 1.0, "compile": compile}, "rows": rows}


def verdicts(checks: list[Any]) -> list[tuple[str, float, bool]]:
    return [(c.target, c.value, c.met) for c in checks]


def test_cuda_rows_give_the_h100_targets() -> None:
    doc = bench("cuda", [
        row("simplified", "seed", "fp32"),
        row("simplified", "trainer", "bf16", ratio_to_seed=21.5, avg_overhead_pct=2.5),
        row("vgg16", "trainer", "bf16", bs=512, pct_of_peak=29.9, avg_overhead_pct=0.4)])
    assert verdicts(targets.benchmark_checks(doc)) == [
        ("CUDA: simplified bf16 >= 20x the seed loop", 21.5, True),
        ("CUDA: averaging < 2% of a step", 2.5, False),
        ("CUDA: VGG16 bf16 batch 512 >= 30% of the bf16 matmul peak", 29.9, False),
        ("CUDA: averaging < 2% of a step", 0.4, True)]


def test_cpu_rows_give_the_cpu_targets() -> None:
    rows = [row("vgg16", "seed", "fp32"),
            row("vgg16", "trainer", "fp32", ratio_to_seed=1.25, pct_of_peak=101.0),
            row("vgg16", "trainer", "bf16", ratio_to_seed=1.9)]
    checks = targets.benchmark_checks(bench("cpu", rows))
    assert verdicts(checks) == [("CPU: fp32 >= 1.25x the seed loop", 1.25, True),
                                ("CPU: >= 80% of the fp32 matmul peak", 101.0, True),
                                ("CPU: bf16 >= 2x the seed loop (native bf16)", 1.9, False)]
    assert checks[1].row().endswith("| met |") and checks[2].row().endswith("**NOT met** |")
    # Without native bf16 the bf16 target does not apply.
    assert len(targets.benchmark_checks(bench("cpu", rows, native_bf16=False))) == 2


def test_metrics_json_gives_the_rss_target() -> None:
    ok = targets.metrics_checks({"train": {"peak_rss_mb": 1700.0}}, "run/metrics.json")
    big = targets.metrics_checks({"train": {"peak_rss_mb": 2900.0}}, "run/metrics.json")
    assert [c.met for c in ok + big] == [True, False]  # 3 GB is 2861 MiB
    assert targets.metrics_checks({"train": {"epochs": 1}}, "old/metrics.json") == []


def test_main_reads_a_folder_and_strict_fails_on_a_missed_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = bench("cuda", [row("simplified", "trainer", "bf16", ratio_to_seed=25.0)],
                 compile="reduce-overhead")
    (tmp_path / "graphs.json").write_text(json.dumps(good))
    (tmp_path / "cifar.json").write_text(json.dumps({"train": {"peak_rss_mb": 1000.0}}))
    (tmp_path / "notes.txt").write_text("ignored")
    assert targets.main([str(tmp_path), "--strict"]) == 0
    out = capsys.readouterr().out
    assert ("| CUDA: simplified bf16 >= 20x the seed loop | Some CUDA, simplified bf16 batch "
            "128, compile reduce-overhead | 25x (1000 images/s) | >= 20x | met |") in out
    assert "3 of 3 checks met" in out
    assert "not measured by these files: CUDA: VGG16 bf16 batch 512" in out
    bad = bench("cpu", [row("simplified", "trainer", "fp32", ratio_to_seed=1.05)])
    (tmp_path / "cpu.json").write_text(json.dumps(bad))
    assert targets.main([str(tmp_path)]) == 0
    assert targets.main([str(tmp_path), "--strict"]) == 1


def test_main_names_a_missing_or_broken_file(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        targets.main([str(tmp_path / "nope.json")])
    assert "nope.json: no such file or folder" in capsys.readouterr().err
    (tmp_path / "cut.json").write_text('{"rows": [')
    with pytest.raises(SystemExit):
        targets.main([str(tmp_path / "cut.json")])
    assert "cut.json: not a readable JSON file" in capsys.readouterr().err
