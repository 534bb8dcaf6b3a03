"""The fast paths: mixed precision, channels-last, torch.compile, and averaging and training
steps that never read a device tensor on the host."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY, compose_config, make_average
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from swa_research.averaging import HostCountAveragedModel
from swa_research.config import UserError
from swa_research.data import Preprocess
from swa_research.training.build import train
from swa_research.training.step import TrainStep, autocast, cpu_has_native, resolve_precision
from swa_research.training.trainer import Trainer

CPU = torch.device("cpu")


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (``.item()``, ``bool()``, ``int()``,
    ``float()``, ``if t > 0``): each dispatches to ``aten._local_scalar_dense``, a
    host-device sync when the tensor lives on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)


# ---------------------------------------------------------------------------------------------
# Precision


def test_cpu_without_native_bf16_gets_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    import swa_research.training.step as step

    monkeypatch.setattr(step, "_NATIVE_CPU_PROBES", {})
    monkeypatch.setattr(step, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    step._warn_emulated.cache_clear()
    step.cpu_has_native.cache_clear()
    assert not step.cpu_has_native("bf16") and not step.cpu_has_native("fp16")
    assert step.cpu_has_native("fp32")
    with caplog.at_level(logging.WARNING, logger="swa_research.training.step"):
        assert resolve_precision("bf16", CPU) == "bf16"
        assert resolve_precision("bf16", CPU) == "bf16"
        assert resolve_precision("fp32", CPU) == "fp32"
    assert caplog.text.count("trainer.precision=bf16 on a CPU without native bf16") == 1
    monkeypatch.setattr(step, "_cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    step.cpu_has_native.cache_clear()
    assert step.cpu_has_native("bf16") and not step.cpu_has_native("fp16")
    step._warn_emulated.cache_clear()
    step.cpu_has_native.cache_clear()  # the real CPU's answers again for later tests


def test_resolve_precision() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, CPU) == name
    with pytest.raises(UserError, match=r"trainer\.precision"):
        resolve_precision("fp8", CPU)
    with autocast("bf16", CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("fp32", CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def finite_run(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    metrics = train(compose_config(overrides), run_dir)
    assert metrics["status"] == "finished"
    for part in ("sgd", "swa"):
        for key in ("test_loss", "test_acc", "val_loss", "val_acc"):
            value = metrics[part][key]
            assert isinstance(value, float) and math.isfinite(value), (part, key)
    assert metrics["swa"]["n_averaged"] > 0
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    return metrics


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(precision: str, tmp_path: Path) -> None:
    base = [*TINY, "model.batch_norm=true", "data.augment=crop_flip"]
    mixed = finite_run([*base, f"trainer.precision={precision}"], tmp_path / precision)
    full = finite_run([*base, "trainer.precision=fp32"], tmp_path / "fp32")
    # Same run in lower precision: close to fp32, not bit-equal.
    assert mixed["sgd"]["test_loss"] == pytest.approx(full["sgd"]["test_loss"], rel=0.02)
    assert mixed["sgd"]["test_loss"] != full["sgd"]["test_loss"]
    # The weights stay fp32 (autocast computes in low precision, the optimizer steps fp32).
    state = torch.load(tmp_path / precision / "swa.pt", weights_only=False)["state_dict"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())


def test_fp16_uses_a_grad_scaler_and_bf16_does_not() -> None:
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert TrainStep(model, opt, "fp16", CPU).scaler.is_enabled()
    assert not TrainStep(model, opt, "bf16", CPU).scaler.is_enabled()
    step = TrainStep(model, opt, "fp16", CPU)
    before = model.weight.detach().clone()
    loss, logits = step(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    assert loss.dtype == torch.float32 and logits.shape == (8, 2)
    assert not loss.requires_grad
    assert not torch.equal(model.weight, before)


# ---------------------------------------------------------------------------------------------
# Memory format


def test_channels_last_gives_the_same_run(tmp_path: Path) -> None:
    # SGD, not Adam: Adam scales the rounding noise in a near-zero gradient (a conv bias
    # before BN) up to lr-sized steps, so its weights would differ by more than the layout.
    base = [*TINY, "model.batch_norm=true", "data.augment=crop_flip", "model.dropout=0.2",
            "optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", "swa.lr=0.05"]
    on = finite_run([*base, "trainer.channels_last=true"], tmp_path / "on")
    off = finite_run([*base, "trainer.channels_last=false"], tmp_path / "off")
    for part in ("sgd", "swa"):
        for key in ("test_loss", "val_loss"):
            assert on[part][key] == pytest.approx(off[part][key], rel=1e-4)
    a = torch.load(tmp_path / "on" / "swa.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "off" / "swa.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    conv = next(k for k, v in a.items() if v.ndim == 4)
    assert a[conv].is_contiguous(memory_format=torch.channels_last)
    assert b[conv].is_contiguous()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5), k


# ---------------------------------------------------------------------------------------------
# Averaging without host reads


@pytest.mark.parametrize("method", ["swa", "ema"])
def test_averaging_matches_averaged_model(method: str) -> None:
    """Same numbers as upstream's AveragedModel, same state dict layout."""
    model = small_net()
    avg_fn = get_ema_multi_avg_fn(0.8) if method == "ema" else None
    ours = make_average(model, method, decay=0.8)
    upstream = AveragedModel(model, multi_avg_fn=avg_fn, use_buffers=False)
    for k in range(4):
        randomize(model, k)
        model[1].num_batches_tracked.fill_(10 * k + 3)  # an int64 buffer follows too
        ours.update(model)
        upstream.update_parameters(model)
    assert ours.n_averaged == 4
    assert int(ours.module[1].num_batches_tracked) == 33
    mine, theirs = ours.averaged.state_dict(), upstream.state_dict()
    assert list(mine) == list(theirs)
    assert "n_averaged" in mine and all(k.startswith("module.") for k in mine if
                                        k != "n_averaged")
    for k in mine:
        assert torch.allclose(mine[k].float(), theirs[k].float(), atol=1e-6), k


class OpCount(TorchDispatchMode):
    """Counts the dispatched ops by name: on a GPU, roughly the kernel launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["swa", "ema"])
def test_an_update_costs_the_same_few_ops_at_any_depth(method: str) -> None:
    """One multi-tensor op for the weights, one copy per buffer dtype, the counter's fill:
    nothing per tensor, so the launches (and host time) of an update do not grow with the
    model's depth."""
    def net(blocks: int) -> nn.Module:
        return nn.Sequential(*[m for _ in range(blocks) for m in (
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())])

    counts = []
    for blocks in (1, 5):
        model = net(blocks)
        avg = make_average(model, method, decay=0.9)
        avg.update(model)  # the first update copies
        randomize(model, 1)
        with OpCount() as c:
            avg.update(model)
        counts.append(c.ops)
        for mine, theirs in zip(avg.module.buffers(), model.buffers(), strict=True):
            assert torch.equal(mine, theirs)
    assert counts[0] == counts[1]
    assert counts[0] == {"aten._foreach_lerp_.Scalar": 1, "aten._foreach_copy_.default": 2,
                         "aten.fill_.Scalar": 1}


def test_an_update_sees_replaced_tensors_and_another_model() -> None:
    """The update reads the model's tensors through slots built once: a parameter or buffer
    replaced since (surgery, ``.to()``) is still the one averaged, and another model (same
    layout) gets slots of its own."""
    model = small_net()
    avg = make_average(model, "swa")
    avg.update(model)
    with torch.no_grad():
        model[0].weight = nn.Parameter(torch.full_like(model[0].weight, 3.0))
        model[1].running_mean = torch.full_like(model[1].running_mean, -2.0)
    avg.update(model)  # mean of the old weight and 3
    old = avg.module[0].weight.clone()
    assert torch.equal(avg.module[1].running_mean, torch.full((4,), -2.0))
    other = small_net()
    with torch.no_grad():
        other[0].weight.fill_(6.0)
    avg.update(other)
    assert torch.allclose(avg.module[0].weight, (2 * old + 6.0) / 3)
    assert torch.equal(avg.module[1].running_mean, other[1].running_mean)


def test_a_copied_or_pickled_average_updates_its_own_tensors() -> None:
    import copy
    import io

    model = small_net()
    avg = make_average(model, "swa")
    avg.update(model)
    twin = copy.deepcopy(avg.averaged)
    buf = io.BytesIO()
    torch.save(avg.averaged, buf)  # a weak reference to the model would not pickle
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    before = avg.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    for copy_ in (twin, loaded):
        copy_.update_parameters(model)
        assert torch.allclose(copy_.module[0].weight, (before + 1.0) / 2)
    assert torch.equal(avg.module[0].weight, before)  # the original is untouched


def test_averaging_reads_nothing_on_the_host() -> None:
    model = small_net()
    avg = make_average(model, "swa")
    with HostReads() as reads:
        for k in range(3):
            randomize(model, k)
            avg.update(model)
    assert reads.count == 0
    assert avg.n_averaged == 3
    # The detector works: upstream's update reads its counter on the host.
    upstream = AveragedModel(model)
    with HostReads() as reads:
        upstream.update_parameters(model)
        upstream.update_parameters(model)
    assert reads.count > 0


def test_n_averaged_survives_a_state_dict_round_trip() -> None:
    model = small_net()
    avg = make_average(model, "swa")
    weights = []
    for k in range(3):
        randomize(model, k)
        weights.append(model[0].weight.detach().clone())
        avg.update(model)
    state = avg.averaged.state_dict()
    assert int(state["n_averaged"]) == 3

    resumed = make_average(small_net(), "swa")
    assert resumed.n_averaged == 0
    resumed.averaged.load_state_dict(state)
    assert resumed.n_averaged == 3
    randomize(model, 9)
    weights.append(model[0].weight.detach().clone())
    resumed.update(model)
    assert resumed.n_averaged == 4 and int(resumed.averaged.n_averaged) == 4
    expected = torch.stack(weights).mean(0)
    assert torch.allclose(resumed.module[0].weight, expected, atol=1e-6)
    assert isinstance(resumed.averaged, HostCountAveragedModel)


def test_bn_update_under_inference_mode_leaves_normal_tensors() -> None:
    """The BN pass runs under inference_mode: the buffers it rewrites must stay normal
    tensors, or the next update (a copy into them outside inference mode) would fail."""
    model = small_net()
    avg = make_average(model, "swa")
    randomize(model, 0)
    avg.update(model)
    data = [(torch.randn(4, 3, 5, 5), torch.zeros(4)) for _ in range(3)]
    assert avg.prepare_for_eval(data) is True
    assert not any(t.is_inference() for t in [*avg.module.parameters(),
                                              *avg.module.buffers()])
    running = avg.module[1].running_mean.clone()
    randomize(model, 1)
    avg.update(model)  # copies the model's BN buffers in: would raise on inference tensors
    assert not torch.equal(avg.module[1].running_mean, running)
    assert avg.prepare_for_eval(data) is True


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_the_step_loop_reads_nothing_on_the_host(optimizer: str, precision: str,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Per epoch, the loop reads the device only for its two logged sums (loss, accuracy),
    however many steps and averages it makes: the fused optimizers keep their step counts on
    the device and take fp16's inf check from the GradScaler without reading it."""
    counts: list[int] = []
    epoch = Trainer.train_epoch

    def counted(self: Trainer, *args: Any) -> tuple[float, float]:
        with HostReads() as reads:
            out = epoch(self, *args)
        counts.append(reads.count)
        return out

    monkeypatch.setattr(Trainer, "train_epoch", counted)
    overrides = [*TINY, f"optimizer={optimizer}", "optimizer.lr=0.01", "swa.lr=0.01",
                 "swa.start=0", "swa.freq=1", "data.augment=crop_flip",
                 f"trainer.precision={precision}",
                 # Logging reads the loss every log_every steps, by design: not in this window.
                 "logger.log_every=1000"]
    metrics = train(compose_config(overrides), tmp_path)
    assert metrics["swa"]["n_averaged"] == metrics["train"]["iterations"]  # every step
    assert counts == [2, 2]


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_compile_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled in place: averaging and the BN update work, state dicts keep their keys,
    results match eager, and evaluations after the first compile nothing new."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    frames: list[int] = []
    evaluate_all = Trainer.evaluate_all

    def counted(self: Trainer, *args: Any) -> dict[str, Any]:
        row = evaluate_all(self, *args)
        frames.append(counters["frames"]["total"])
        return row

    monkeypatch.setattr(Trainer, "evaluate_all", counted)
    base = [*TINY, "model.batch_norm=true", "model.dropout=0", "trainer.epochs=3"]
    compiled = finite_run([*base, "trainer.compile=true"], tmp_path / "compiled")
    assert len(frames) == 3 and frames[0] > 0
    assert frames[1] == frames[0] and frames[2] == frames[0]  # no recompiles
    eager = finite_run(base, tmp_path / "eager")
    for part in ("sgd", "swa"):
        assert compiled[part]["test_loss"] == pytest.approx(eager[part]["test_loss"],
                                                            rel=1e-3)
    for name in ("sgd_final.pt", "swa.pt"):
        a = torch.load(tmp_path / "compiled" / name, weights_only=False)["state_dict"]
        b = torch.load(tmp_path / "eager" / name, weights_only=False)["state_dict"]
        assert list(a) == list(b)  # no _orig_mod. prefix


def test_compile_mode_reaches_torch_compile(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.compile_mode is passed to model.compile (CUDA graphs with reduce-overhead on a
    GPU); default passes no mode; a wrong mode is a one-line config error."""
    modes: list[Any] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    finite_run([*TINY, "trainer.compile=true", "trainer.compile_mode=reduce-overhead"],
               tmp_path / "a")
    finite_run([*TINY, "trainer.compile=true"], tmp_path / "b")
    finite_run([*TINY, "trainer.compile_mode=max-autotune"], tmp_path / "c")  # compile off
    assert modes == ["reduce-overhead", None]
    import torch._inductor

    from swa_research.config import CHOICES

    assert set(CHOICES["trainer.compile_mode"]) <= set(torch._inductor.list_mode_options())
    with pytest.raises(UserError, match=r"trainer\.compile_mode='fast': expected one of default"):
        train(compose_config([*TINY, "trainer.compile_mode=fast"]), tmp_path / "d")


# ---------------------------------------------------------------------------------------------
# The benchmark script


BENCHMARK_COLUMNS = [
    "model", "path", "precision", "batch_size", "images_per_s", "ratio_to_seed", "ms_per_step",
    "avg_update_ms", "avg_overhead_pct", "peak_gpu_mb", "peak_rss_mb", "tflops",
    "matmul_peak_tflops", "pct_of_peak"]


def run_benchmark(args: list[str], out: Path) -> tuple[dict[str, Any], str]:
    """scripts/benchmark.py on the CPU with one thread (other tests may run) and this
    checkout's package, whatever is installed; returns its JSON and its stdout."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "benchmark.py"), *args, "--threads", "1",
         "--device", "cpu", "--matmul-size", "128", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_benchmark_runs_tiny(tmp_path: Path) -> None:
    result, stdout = run_benchmark(
        ["--steps", "3", "--width", "0.125", "--rounds", "2", "--warmup", "1", "--num-images",
         "512", "--avg-calls", "1", "--loader-batches", "2", "--precision", "fp32,bf16"],
        tmp_path / "bench.json")
    assert result["columns"] == BENCHMARK_COLUMNS
    assert set(result) >= {"machine", "setup", "matmul_peak_tflops", "loader_images_per_s",
                           "rows"}
    assert set(result["matmul_peak_tflops"]) == {"fp32", "bf16"}
    assert result["machine"]["native_bf16"] == cpu_has_native("bf16")
    rows = result["rows"]
    assert [(r["model"], r["path"], r["precision"]) for r in rows] == [
        (m, path, prec) for m in ("simplified", "vgg16")
        for path, prec in (("seed", "fp32"), ("trainer", "fp32"), ("trainer", "bf16"))]
    for r in rows:
        assert set(BENCHMARK_COLUMNS) <= set(r)
        assert r["batch_size"] == 128 and r["peak_gpu_mb"] is None  # CPU
        for key in ("images_per_s", "ratio_to_seed", "ms_per_step", "avg_update_ms",
                    "avg_overhead_pct", "peak_rss_mb", "tflops", "matmul_peak_tflops",
                    "pct_of_peak"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, key
        assert r["ms_per_step"] == pytest.approx(1000 * 128 / r["images_per_s"], rel=1e-3)
        assert len(r["images_per_s_rounds"]) == 2
        if r["path"] == "seed":
            assert r["ratio_to_seed"] == 1.0
    assert rows[0]["flops_per_step"] > 0 and rows[0]["flops_per_step"] != rows[3][
        "flops_per_step"]
    # Nominal FLOPs, the same for every path of a model.
    assert len({r["flops_per_step"] for r in rows[:3]}) == 1
    assert "conv_algorithm" not in result["setup"]
    # The same table on stdout, in Markdown.
    assert "| model | path | prec | img/s | x seed |" in stdout
    assert stdout.count("| simplified |") == 3


def load_script(name: str) -> Any:
    """scripts/NAME.py as a module."""
    import importlib.util
    import sys

    module_name = f"scripts_{name}"
    spec = importlib.util.spec_from_file_location(
        module_name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("native", [True, False])
def test_benchmark_measures_bf16_by_default_only_where_native(
        native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_script("benchmark")
    monkeypatch.setattr(bench, "cpu_has_native", lambda precision: native)
    args = bench.parse_args(["--device", "cpu"])
    assert args.precisions == (["fp32", "bf16"] if native else ["fp32"])
    assert bench.parse_args(["--device", "cpu", "--precision", "bf16"]).precisions == ["bf16"]


def test_benchmark_trainer_path_is_a_run_built_by_swa_research_build(tmp_path: Path) -> None:
    """The trainer path is the Trainer that swa_research.training.build makes from a config: the
    seed's Adam at lr 1e-4, the "swa" average every 50 iterations, the precision asked for."""
    bench = load_script("benchmark")
    args = bench.parse_args(["--device", "cpu", "--model", "simplified", "--width", "0.0625",
                             "--batch-size", "4", "--num-images", "40", "--precision", "bf16",
                             "--no-channels-last"])
    config = bench.bench_config(args, "simplified", "bf16", CPU, iterations=60,
                                iters_per_epoch=9)
    assert config.model["name"] == "simplified" and config.model["width"] == 0.0625
    assert (config.trainer.epochs, config.swa.freq, config.swa.lr) == (12, 50, 1e-4)
    loop = bench.TrainerLoop(config, CPU, tmp_path)
    trainer = loop.trainer
    assert isinstance(trainer, Trainer) and list(trainer.averages) == ["swa"]
    assert trainer.precision == "bf16" and not trainer.cfg.channels_last
    assert len(trainer.data.train) == 36  # the config's validation split holds out 10%
    loop.run(49)
    assert loop.average.n_averaged == 0
    loop.run(2)
    assert trainer.iteration == 51 and loop.average.n_averaged == 1  # after step 50
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    loop.update_average()
    assert loop.average.n_averaged == 2


def test_benchmark_never_imports_the_hydra_entry_point() -> None:
    """The trainer path comes from swa_research.training.build: neither swa_research.train nor Hydra
    is imported (a fresh process: this one may hold both)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "benchmark.py"
    code = (f"import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('bench', {str(script)!r})\n"
            "module = sys.modules['bench'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "print(sorted(m for m in sys.modules if m in ('swa_research.train', 'hydra')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--layers"], ["--conv-algorithm", "winograd"],
                                  ["--model", "vgg99"], ["--width", "0"]])
def test_benchmark_refuses_removed_options_and_bad_models(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("benchmark")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu", *argv])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_benchmark_times_queued_calls_per_call() -> None:
    bench = load_script("benchmark")
    calls = []
    seconds = bench.time_queued(lambda: calls.append(1), torch.device("cpu"), calls=7)
    assert len(calls) == 8 and seconds >= 0  # one untimed call first, then 7 timed


@pytest.mark.parametrize("option", ["--json", "--profile"])
def test_benchmark_refuses_an_unwritable_output_path_before_measuring(
        option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_script("benchmark")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--device", "cpu", option, str(tmp_path / "a_file" / "b.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{option} {tmp_path / 'a_file' / 'b.json'}: cannot write in" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]  # no probe file left behind


def test_busy_time_is_the_union_of_the_intervals() -> None:
    busy_us = load_script("benchmark").busy_us
    assert busy_us([]) == 0
    assert busy_us([(20.0, 25.0), (0.0, 10.0), (5.0, 15.0)]) == 20  # overlap counted once
    assert busy_us([(0.0, 10.0), (2.0, 3.0)]) == 10  # nested
    assert busy_us([(0.0, 1.0), (1.0, 2.0), (4.0, 6.0)]) == 4  # touching, then a gap


@pytest.mark.slow  # the benchmark itself: test_benchmark_runs_tiny; --profile's path check above
def test_benchmark_profile_writes_the_op_tables(tmp_path: Path) -> None:
    profile = tmp_path / "profile.txt"
    result, _ = run_benchmark(
        ["--model", "simplified", "--steps", "2", "--width", "0.125", "--rounds", "1",
         "--warmup", "1", "--num-images", "512", "--avg-calls", "1", "--loader-batches", "1",
         "--precision", "fp32", "--profile", str(profile), "--profile-steps", "2"],
        tmp_path / "bench.json")
    seed, trainer = result["rows"]
    assert "device_busy_pct" not in seed
    # No GPU here: nothing to be busy, and the keys say so rather than guess.
    assert trainer["device_busy_ms_per_step"] is None and trainer["device_busy_pct"] is None
    text = profile.read_text()
    assert text.startswith("torch.profiler, 2 steps per trainer path")
    assert "## simplified trainer fp32, batch 128:" in text
    assert "aten::convolution_backward" in text and "Self CPU" in text



@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """scripts/gpu_check.sh with QUICK=1 DEVICE=cpu: every step runs and leaves its file."""
    import os
    import subprocess
    import tarfile

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    # A small stand-in for the CIFAR-10 JPEG copy, in its layout: 600 + 20 images of 32x32
    # (QUICK's seed-experiment run keeps half for validation: two steps of batch 128).
    g = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 300), ("test", 10)):
        for c in range(2):
            folder = tmp_path / "cifar10-jpeg" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg")
    with tarfile.open(tmp_path / "data.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar10-jpeg", arcname="cifar10-jpeg")
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(out),
           "DATA_TARBALL": str(tmp_path / "data.tar.gz"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    for step in ("smoke", "bench128", "bench512", "graphs", "cifar", "data_memory",
                 "data_stream"):
        assert f"{step}: exit 0," in summary, summary
    assert "scaling: skipped (0 GPU(s)" in summary
    assert re.search(r"data_stream: loader wait \d+% of training", summary), summary
    for name in ("cifar.json", "data_memory.json", "data_stream.json"):
        assert json.loads((out / name).read_text())["status"] == "finished"
    # The targets judged at the end: fp32 against the seed loop, per model of bench128.
    targets = summary.split("----- targets\n", 1)[1]
    assert targets.count("| CPU: fp32 >= 1.25x the seed loop | ") == 2, targets
    assert "checks met" in targets
    for name in ("bench128.json", "bench512.json", "graphs.json"):
        assert json.loads((out / name).read_text())["rows"]
    profile = (out / "profile.txt").read_text()
    assert profile.count("## simplified trainer") == 3  # bench128's fp32 and bf16, graphs'
    assert "===== graphs (--compile default)" in profile
    assert len(list(out.iterdir())) <= 11  # what the device tool brings back


@pytest.mark.parametrize("normalize", [True, False])
def test_a_batch_becomes_floats_in_one_op(normalize: bool) -> None:
    """uint8 to normalised floats is one kernel (a multiply-add, or ToTensor's division), in
    the trainer's layout; a layout change, where needed, is one copy of the uint8 batch."""
    pre = Preprocess(normalize, [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261],
                     torch.device("cpu"), memory_format=torch.channels_last)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    x_last = x.contiguous(memory_format=torch.channels_last)
    with OpCount() as already:
        out = pre.to_float(x_last)
    with OpCount() as convert:
        out_from_nchw = pre.to_float(x)
    assert sum(already.ops.values()) == 1, already.ops
    assert sum(convert.ops.values()) == 2, convert.ops
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_from_nchw)


def test_the_lm_benchmark_measures_tokens_per_second_and_mfu(tmp_path: Path) -> None:
    """scripts/benchmark.py --task lm: a GPT of the trainer's own making, its tokens/s, the
    TFLOPS its FLOPs count gives and the MFU against the peak given."""
    out = tmp_path / "lm.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "benchmark.py"), "--task", "lm", "--shape",
         "tiny", "--device", "cpu", "--steps", "2", "--rounds", "2", "--batch-size", "4",
         "--grad-accum", "2", "--peak-tflops", "1.5", "--avg-calls", "2", "--matmul-size",
         "128", "--json", str(out)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert set(result["columns"]) <= set(row)
    assert (row["shape"], row["block"], row["tokens_per_step"], row["grad_accum"]) == (
        "tiny", 64, 256, 2)
    assert row["tokens_per_s"] > 0 and len(row["tokens_per_s_rounds"]) == 2
    assert row["ms_per_step"] == pytest.approx(1000 * 256 / row["tokens_per_s"], rel=1e-3)
    from swa_research.models import build_model, resolve_model_config
    gpt = build_model(resolve_model_config({"name": "gpt", "n_layer": 2, "n_head": 2,
                                            "n_embd": 64, "block_size": 64}), 256)
    assert row["tflops"] == pytest.approx(gpt.flops_per_token() * row["tokens_per_s"] / 1e12,
                                          rel=1e-3, abs=1e-4)
    assert row["mfu_pct"] == pytest.approx(100 * row["tflops"] / 1.5, rel=1e-2, abs=1e-2)
    assert row["ema_update_ms"] > 0 and row["peak_gpu_mb"] is None
    assert "| tiny | fp32 |" in proc.stdout
    bad = subprocess.run([sys.executable, str(root / "scripts" / "benchmark.py"), "--task",
                          "lm", "--shape", "huge", "--device", "cpu"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert bad.returncode == 1 and "--shape huge: expected some of tiny" in bad.stderr


def test_the_start_imports_only_what_a_run_uses() -> None:
    """The command line's module and a language model's config imports no torchvision, W&B,
    MLflow, TensorBoard, Lightning or plotting (each 20-170 MiB of resident memory), and the
    config check of a model on the meta device does not pull in torch._dynamo (160 MiB)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import swa_research.train\n"
        "from swa_research.training.build import load_config\n"
        "load_config({'task': {'name': 'lm'}, 'data': {'name': 'text', 'root': 'x.txt'},\n"
        "             'model': {'name': 'gpt', 'n_layer': 12, 'n_head': 12, 'n_embd': 768,\n"
        "                       'block_size': 1024}})\n"
        "heavy = ('torchvision', 'wandb', 'mlflow', 'tensorboard', 'lightning', 'matplotlib',\n"
        "         'scipy', 'torch._dynamo')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_fsdp_benchmark_times_a_sharded_and_a_whole_average(tmp_path: Path) -> None:
    """scripts/benchmark.py --strategy fsdp on 2 CPU processes: the trainer under FSDP and
    under DDP, its step and one EMA update timed; under FSDP the average on a rank is half of
    the whole model's bytes (the tiny GPT's parameters at 4 bytes, counted here), under DDP
    all of it."""
    out = tmp_path / "fsdp.json"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(root / "scripts" / "benchmark.py"), "--strategy", "fsdp",
         "--ranks", "2", "--shape", "tiny", "--steps", "2", "--rounds", "1", "--warmup", "1",
         "--avg-calls", "2", "--json", str(out)], capture_output=True, text=True,
        timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in result["rows"]}
    assert set(rows) == {"fsdp", "ddp"} and set(result["columns"]) <= set(rows["fsdp"])
    from swa_research.models import build_model, resolve_model_config
    gpt = build_model(resolve_model_config({"name": "gpt", "n_layer": 2, "n_head": 2,
                                            "n_embd": 64, "block_size": 64}), 256)
    whole = sum(p.numel() for p in gpt.parameters()) * 4
    assert sum(rows["fsdp"]["avg_bytes_ranks"]) == whole
    assert rows["fsdp"]["avg_share"] == pytest.approx(0.5, abs=0.01)
    assert rows["ddp"]["avg_bytes_ranks"] == [whole, whole] and rows["ddp"]["avg_share"] == 1
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["avg_update_ms"] > 0
        assert r["avg_overhead_pct"] == pytest.approx(
            100 * r["avg_update_ms"] / r["ms_per_step"], rel=0.02)
    assert "fsdp | 2 | tiny | fp32 |" in proc.stdout
    bad = subprocess.run([sys.executable, str(root / "scripts" / "benchmark.py"),
                          "--strategy", "fsdp", "--ranks", "1"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 1 and "--ranks 1: DDP needs at least 2 processes" in bad.stderr
