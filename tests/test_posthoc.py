"""Weight snapshots during training (trainer.snapshot_every) and the averages formed from them
after training (python -m swa_research.posthoc): equal to the online averages over the same
points, LAWA, the grid's files, kill and resume, the disk estimate and its check, EMA warmup."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config, fault_env
from omegaconf import OmegaConf

from swa_research.analysis.posthoc import PosthocRun, Setting, main, select
from swa_research.averaging.ema import ema_multi_avg_fn, warmup_decay
from swa_research.config import TrainerConfig, UserError
from swa_research.models import build_model, resolve_model_config
from swa_research.training.build import load_config, train
from swa_research.training.snapshots import (
    INDEX,
    TRAJECTORY,
    SnapshotWriter,
    bytes_per_snapshot,
    snapshot_points,
)

# 115 training images, batch 32: 3 iterations an epoch. BN, so that the BN pass matters.
BASE = ["experiment=smoke", *TINY, "model.batch_norm=true", "trainer.epochs=4"]
# Online SWA after epochs 2, 3 and 4; a snapshot after every epoch.
SWA_RUN = [*BASE, "swa.unit=epoch", "swa.start=2", "swa.freq=1",
           "trainer.snapshot_every=1", "trainer.snapshot_unit=epoch"]


def run(tmp: Path, overrides: list[str]) -> Path:
    """A run dir as the entry point leaves it: the run's files and .hydra/config.yaml."""
    cfg = compose_config(overrides)
    train(cfg, tmp)
    (tmp / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp / ".hydra" / "config.yaml")
    return tmp


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("swa") / "run", SWA_RUN)


def snapshots_of(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / TRAJECTORY / INDEX).read_text())["snapshots"]


def rows_of(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "posthoc.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6
                 ) -> None:
    assert set(a) == set(b)
    for k in a:
        if a[k].is_floating_point():
            diff = (a[k].float().cpu() - b[k].float().cpu()).abs().max().item()
            assert diff <= tol, (k, diff)
        else:
            assert torch.equal(a[k].cpu(), b[k].cpu()), k


def test_posthoc_equal_average_is_the_online_swa(swa_run: Path, capsys) -> None:  # noqa: ANN001
    assert [e["epoch"] for e in snapshots_of(swa_run)] == [1, 2, 3, 4]
    assert [e["file"] for e in snapshots_of(swa_run)][0] == "it000003.pt"
    ph = PosthocRun(swa_run, torch.device("cpu"))
    setting = Setting("swa", start=2, freq=1, window=0)
    chosen = select(setting, ph.index["snapshots"], "epoch")
    assert [e["epoch"] for e in chosen] == [2, 3, 4]
    module = ph.average(setting, chosen)
    online = torch.load(swa_run / "swa.pt", weights_only=True)
    assert online["n_averaged"] == 3
    assert_close(module.state_dict(), online["state_dict"])  # BN statistics included
    assert main([str(swa_run), "--swa-start", "2", "--device", "cpu"]) == 0
    row, = rows_of(swa_run)
    metrics = json.loads((swa_run / "metrics.json").read_text())
    assert float(row["test_acc"]) == metrics["swa"]["test_acc"]
    assert float(row["test_loss"]) == pytest.approx(metrics["swa"]["test_loss"], abs=1e-6)
    assert float(row["nll"]) == pytest.approx(metrics["calibration"]["swa"]["nll"], abs=1e-6)
    assert float(row["ece"]) == pytest.approx(metrics["calibration"]["swa"]["ece"], abs=1e-6)
    assert row["n_points"] == "3" and (row["first"], row["last"]) == ("2", "4")


@pytest.mark.parametrize("warmup", [True, False])
def test_posthoc_ema_over_every_step_is_the_online_ema(tmp_path: Path, warmup: bool) -> None:
    run_dir = run(tmp_path / "run", [*BASE, "trainer.epochs=2", "swa=ema", "swa.unit=iter",
                                     "swa.start=0", "swa.freq=1", "swa.decay=0.9",
                                     f"swa.ema_warmup={str(warmup).lower()}",
                                     "trainer.snapshot_every=1", "trainer.snapshot_unit=iter"])
    ph = PosthocRun(run_dir, torch.device("cpu"))
    entries = ph.index["snapshots"]
    assert [e["iteration"] for e in entries] == list(range(1, 7))
    online = torch.load(run_dir / "swa.pt", weights_only=True)
    assert online["n_averaged"] == 6
    setting = Setting("ema", decay=0.9, warmup=warmup)
    assert_close(ph.average(setting, select(setting, entries, "iter")).state_dict(),
                 online["state_dict"])
    other = Setting("ema", decay=0.9, warmup=not warmup)
    diff = max((p.detach() - online["state_dict"][name]).abs().max().item()
               for name, p in ph.average(other, entries).named_parameters())
    assert diff > 1e-4  # the warmup changes the average: the comparison above means something


def test_lawa_is_the_mean_of_the_last_k_snapshots(swa_run: Path) -> None:
    ph = PosthocRun(swa_run, torch.device("cpu"))
    setting = Setting("lawa", k=3)
    chosen = select(setting, ph.index["snapshots"], "epoch")
    assert [e["epoch"] for e in chosen] == [2, 3, 4]
    module = ph.average(setting, chosen)
    states = [torch.load(swa_run / TRAJECTORY / e["file"], weights_only=True)["state_dict"]
              for e in chosen]
    for name, p in module.named_parameters():
        mean = torch.stack([s[name] for s in states]).mean(0)
        assert (p.detach() - mean).abs().max().item() <= 1e-6, name


def test_a_three_by_three_grid_writes_nine_rows_and_the_plot(swa_run: Path, capsys) -> None:  # noqa: ANN001
    code = main([str(swa_run), "--swa-start", "1,2,3", "--window", "0,1,2",
                 "--ema-decay", "0.5", "--lawa-k", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = rows_of(swa_run)
    swa = [r for r in rows if r["kind"] == "swa"]
    assert len(swa) == 9 and len(rows) == 11
    assert {(r["start"], r["window"]) for r in swa} == {
        (s, w) for s in ("1", "2", "3") for w in ("0", "1", "2")}
    n = {(r["start"], r["window"]): int(r["n_points"]) for r in swa}
    assert n[("1", "0")] == 4 and n[("3", "0")] == 2 and n[("1", "1")] == 1
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 and r["nll"] for r in rows)
    assert out.count("[") >= 11 and "[11/11] lawa k=2" in out
    assert "best by validation accuracy" in out
    png = swa_run / "posthoc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_dir_evaluates_every_run_with_snapshots(swa_run: Path, tmp_path: Path,
                                                        capsys) -> None:  # noqa: ANN001
    for job in ("0", "1"):
        shutil.copytree(swa_run, tmp_path / "sweep" / job)
    (tmp_path / "sweep" / "2").mkdir()  # a job without snapshots is passed over
    (tmp_path / "sweep" / "2" / "metrics.json").write_text('{"status": "failed"}')
    assert main([str(tmp_path / "sweep"), "--swa-start", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("best by") == 2
    assert all(len(rows_of(tmp_path / "sweep" / j)) == 1 for j in ("0", "1"))


@pytest.mark.parametrize(("args", "message"), [
    (["--swa-start", "a,b"], "--swa-start='a,b': expected comma-separated integers"),
    (["--swa-start", "9"], "--swa-start=9: no snapshot at or after epoch 9"),
    (["--window", "-1"], "--window='-1': -1 is out of range"),
    (["--ema-decay", "1.5"], "--ema-decay='1.5': 1.5 is out of range"),
    (["--lawa-k", "5"], "--lawa-k=5: the run has only 4 snapshots"),
    (["--swa-freq", "0"], "--swa-freq='0': 0 is out of range"),
])
def test_a_bad_list_is_a_one_line_error(swa_run: Path, args: list[str], message: str,
                                        capsys) -> None:  # noqa: ANN001
    assert main([str(swa_run), *args, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_run_without_snapshots_is_a_one_line_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run_dir = run(tmp_path / "run", [*BASE, "trainer.epochs=1"])
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "holds no snapshots" in err and "trainer.snapshot_every" in err
    assert err.count("\n") == 1
    assert main([str(tmp_path / "missing")]) == 2
    assert not (run_dir / "posthoc.csv").exists()


def test_snapshot_points_and_config_checks() -> None:
    assert list(snapshot_points("epoch", 2, 5, 3)) == [6, 12]
    assert list(snapshot_points("iter", 4, 2, 5)) == [4, 8]
    assert list(snapshot_points("iter", 0, 2, 5)) == []
    with pytest.raises(UserError, match="trainer.snapshot_every=-1: must be >= 0"):
        load_config(compose_config([*BASE, "trainer.snapshot_every=-1"]))
    with pytest.raises(UserError, match="trainer.snapshot_unit='step'"):
        load_config(compose_config([*BASE, "trainer.snapshot_unit=step"]))
    with pytest.raises(UserError, match="trainer.snapshot_dtype='fp16'"):
        load_config(compose_config([*BASE, "trainer.snapshot_dtype=fp16"]))


def test_ema_warmup_decay_formula() -> None:
    # timm ModelEmaV3.get_decay(step) with use_warmup: 1 - (1 + step) ** (-2/3) at its step
    # n + 1 (the first step, decay 0, copies): 1 - 2 ** (-2/3) = 0.370 for the second point.
    assert warmup_decay(0.999, 1) == pytest.approx(0.3700394750, abs=1e-9)
    assert warmup_decay(0.999, 31) == pytest.approx(1 - 32 ** (-2 / 3))
    assert warmup_decay(0.9, 100) == 0.9  # capped at the decay
    assert warmup_decay(0.999, 999) == pytest.approx(0.99)
    assert all(warmup_decay(0.999, n) == min(0.999, 1 - (1 + n) ** (-2 / 3))
               for n in range(1, 5000))
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    d = 1 - 2 ** (-2 / 3)
    ema_multi_avg_fn(0.999, warmup=True)(avg, cur, 1)  # the second point: decay 0.370
    assert torch.allclose(avg[0], torch.full((3,), 1 - d))
    ema_multi_avg_fn(0.5, warmup=False)(avg, cur, 1)
    assert torch.allclose(avg[0], torch.full((3,), 0.5 * (1 - d) + 0.5))


def small_model() -> torch.nn.Module:
    cfg = resolve_model_config({"name": "simplified", "batch_norm": True, "width": 0.0625})
    return build_model(cfg, 10, 32)


def test_the_disk_estimate_is_the_bytes_written(swa_run: Path, tmp_path: Path) -> None:
    """The estimate counts tensor data; torch.save's zip format adds a few hundred bytes per
    tensor (measured: about 300 B per tensor, 14 KB for the smoke model's 48 tensors)."""
    model = small_model()
    state = model.state_dict()
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        cfg = TrainerConfig(epochs=1, snapshot_every=1, snapshot_unit="iter", snapshot_dtype=name)
        writer = SnapshotWriter(tmp_path / name, cfg, iters_per_epoch=3)
        writer.prepare(model, 0)
        for n in (1, 2, 3):
            writer.save(model, n)
        files = sorted((tmp_path / name / TRAJECTORY).glob("it*.pt"))
        assert len(files) == 3
        estimate = bytes_per_snapshot(model, dtype) * 3
        written = sum(f.stat().st_size for f in files)
        overhead = (written - estimate) / 3
        assert 0 <= overhead <= 64 + 512 * len(state), overhead
        saved = torch.load(files[0], weights_only=True)["state_dict"]
        for k, v in saved.items():
            assert v.dtype == (dtype if state[k].is_floating_point() else state[k].dtype), k
        counts = [v for k, v in saved.items() if k.endswith("num_batches_tracked")]
        assert counts and all(v.dtype == torch.int64 for v in counts)
    # The run's own files: the same rule.
    files = sorted((swa_run / TRAJECTORY).glob("it*.pt"))
    per = sum(v.numel() * v.element_size() for v in torch.load(
        files[0], weights_only=True)["state_dict"].values())
    assert 0 <= files[0].stat().st_size - per <= 64 + 512 * len(state)


def test_a_plan_larger_than_the_free_disk_is_refused(tmp_path: Path, caplog,  # noqa: ANN001
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with caplog.at_level(logging.INFO), pytest.raises(UserError) as e:
        train(compose_config(SWA_RUN), tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and "trainer.snapshot_every=1 (epoch): 4 snapshots of" in msg
    assert "1000 B free" in msg
    assert "snapshots: 4 (every 1 epoch, fp32)" in caplog.text
    assert not list((tmp_path / "run").glob(f"{TRAJECTORY}/*.pt"))
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_prepare_keeps_snapshots_up_to_the_checkpoint_and_drops_later_ones(tmp_path: Path
                                                                           ) -> None:
    model = small_model()
    cfg = TrainerConfig(epochs=2, snapshot_every=2, snapshot_unit="iter")
    writer = SnapshotWriter(tmp_path, cfg, iters_per_epoch=5)
    writer.prepare(model, 0)
    for n in (2, 4, 6, 8):  # killed after the snapshot at 8, the checkpoint was at 5
        writer.save(model, n)
    (tmp_path / TRAJECTORY / ".it000010.pt.abc.tmp").write_bytes(b"half")
    resumed = SnapshotWriter(tmp_path, cfg, iters_per_epoch=5)
    resumed.prepare(model, 5)
    assert [e["iteration"] for e in snapshots_of(tmp_path)] == [2, 4]
    assert sorted(p.name for p in (tmp_path / TRAJECTORY).iterdir()) == [
        INDEX, "it000002.pt", "it000004.pt"]
    for n in (6, 8, 10):
        resumed.save(model, n)
    assert [e["iteration"] for e in snapshots_of(tmp_path)] == [2, 4, 6, 8, 10]
    assert [e["epoch"] for e in snapshots_of(tmp_path)] == [1, 1, 2, 2, 2]


# 231 training images, batch 32: 7 iterations an epoch, 21 in all; a snapshot every 2.
KILL_RUN = ["experiment=smoke", *TINY, "data.train_size=256", "model.batch_norm=true",
            "trainer.epochs=3", "trainer.deterministic=true", "swa.start=0.4", "swa.freq=2",
            "trainer.snapshot_every=2", "trainer.snapshot_unit=iter"]


def launch(run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fault_env(fault)}
    return subprocess.run(
        [sys.executable, "-m", "swa_research.train", *KILL_RUN, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300)


@pytest.mark.slow
def test_snapshots_survive_kill_and_resume(tmp_path: Path) -> None:
    tmp_path.joinpath("a").mkdir()
    tmp_path.joinpath("b").mkdir()
    baseline = tmp_path / "a" / "run"
    assert launch(baseline).returncode == 0
    run_dir = tmp_path / "b" / "run"
    # Killed in the 11th step: snapshots up to 10 were written, the checkpoint is at 7.
    killed = launch(run_dir, fault="step@11")
    assert killed.returncode == -9, killed.stdout[-2000:]
    assert [e["iteration"] for e in snapshots_of(run_dir)] == [2, 4, 6, 8, 10]
    resumed = launch(run_dir)
    assert resumed.returncode == 0, resumed.stdout[-2000:]
    assert "snapshots: 3 on disk up to iteration 7" in resumed.stdout
    entries = snapshots_of(run_dir)
    assert entries == snapshots_of(baseline)
    assert [e["iteration"] for e in entries] == list(range(2, 22, 2))  # no gap, no duplicate
    assert sorted(p.name for p in (run_dir / TRAJECTORY).glob("it*.pt")) == [
        e["file"] for e in entries]
    for e in entries:  # deterministic on CPU: the resumed trajectory is the baseline's
        a = torch.load(baseline / TRAJECTORY / e["file"], weights_only=True)
        b = torch.load(run_dir / TRAJECTORY / e["file"], weights_only=True)
        assert a["iteration"] == b["iteration"] == e["iteration"]
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_no_flags_evaluate_a_default_grid_and_name_the_best(swa_run: Path, tmp_path: Path,
                                                           capsys) -> None:  # noqa: ANN001
    """Without flags: starts at 0, 1/4, 1/2, 3/4 of the trajectory, EMAs and LAWA; the best by
    validation is named. Four epoch snapshots: starts 1, 2, 3, 4; LAWA k=2 (k < 4)."""
    run_dir = tmp_path / "run"
    shutil.copytree(swa_run, run_dir)
    assert main([str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = rows_of(run_dir)
    swa = [r for r in rows if r["kind"] == "swa"]
    assert [r["start"] for r in swa] == ["1", "2", "3", "4"]
    assert [r["k"] for r in rows if r["kind"] == "lawa"] == ["2"]
    assert [r["decay"] for r in rows if r["kind"] == "ema"] == ["0.5"]  # horizon max(2, n/8)
    best = max(rows, key=lambda r: float(r["val_acc"]))
    assert "best by validation accuracy" in out and f"(n={best['n_points']})" in out


def test_bf16_snapshots_are_said_to_approximate(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run_dir = run(tmp_path / "run", [*SWA_RUN, "trainer.snapshot_dtype=bf16"])
    assert main([str(run_dir), "--swa-start", "2", "--device", "cpu"]) == 0
    assert "note: the snapshots are bf16: their averages approximate the online ones" in \
        capsys.readouterr().out


@pytest.mark.parametrize(("edit", "message"), [
    (lambda ix: ix.pop("unit"), "not a snapshot index (missing unit)"),
    (lambda ix: ix["snapshots"][0].pop("epoch"), "snapshot entry 0 must hold integer"),
    (lambda ix: ix["snapshots"][1].update(file="../../../metrics.json"),
     "snapshot entry 1 names '../../../metrics.json', a file outside trajectory/"),
    (lambda ix: ix["snapshots"][2].update(file="/etc/passwd"),
     "snapshot entry 2 names '/etc/passwd', a file outside trajectory/"),
    (lambda ix: ix.update(every="4"), "every a positive integer"),
])
def test_a_malformed_or_escaping_index_is_a_one_line_error(swa_run: Path, tmp_path: Path, edit,
                                                           message: str, capsys) -> None:  # noqa: ANN001
    run_dir = tmp_path / "run"
    shutil.copytree(swa_run, run_dir)
    (run_dir / "posthoc.csv").unlink(missing_ok=True)  # left by the tests before
    path = run_dir / TRAJECTORY / INDEX
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    assert main([str(run_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (run_dir / "posthoc.csv").exists()


def test_snapshots_of_another_model_and_a_tagged_config_are_one_line_errors(
        swa_run: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    run_dir = tmp_path / "run"
    shutil.copytree(swa_run, run_dir)
    cfg_path = run_dir / ".hydra" / "config.yaml"
    original = cfg_path.read_text()
    # Snapshots paired with another run's config: a wider model.
    cfg_path.write_text(original.replace("width: 0.0625", "width: 0.125"))
    assert "width: 0.125" in cfg_path.read_text()
    assert main([str(run_dir), "--swa-start", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model of" in err and "size mismatch" in err, err
    assert err.count("\n") == 1
    # A YAML python tag is refused by the safe loader, never constructed.
    marker = tmp_path / "pwned"
    cfg_path.write_text(original + f"evil: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main([str(run_dir), "--swa-start", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot be read as a run's config" in err and err.count("\n") == 1, err
    assert not marker.exists()


def test_device_errors_name_the_flag(swa_run: Path, capsys) -> None:  # noqa: ANN001
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main([str(swa_run), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA GPU is available here; use --device cpu or auto" in err
    assert "trainer.device" not in err


def test_a_failed_snapshot_write_is_one_line_and_keeps_what_was_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk at the third snapshot: a UserError of one line (exit 2 from the entry
    point), metrics.json "failed" with it, the earlier snapshots and the checkpoint kept, and
    the rerun resumes and finishes with the whole trajectory."""
    import errno

    import swa_research.training.snapshots as snapshots_mod

    real, calls = snapshots_mod.atomic_torch_save, []

    def full_disk(obj: object, path: Path) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(snapshots_mod, "atomic_torch_save", full_disk)
    with pytest.raises(UserError) as e:
        train(compose_config(SWA_RUN), tmp_path)
    msg = str(e.value)
    assert msg.startswith("no space left on device writing ") and "it000009.pt" in msg
    assert "the snapshots up to iteration 6 and the last checkpoint are kept" in msg
    assert "\n" not in msg
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "no space left on device" in metrics["error"]
    assert [e["iteration"] for e in snapshots_of(tmp_path)] == [3, 6]
    assert (tmp_path / "checkpoint.pt").is_file()
    monkeypatch.setattr(snapshots_mod, "atomic_torch_save", real)
    m = train(compose_config(SWA_RUN), tmp_path)
    assert m["status"] == "finished"
    assert [e["iteration"] for e in snapshots_of(tmp_path)] == [3, 6, 9, 12]
