"""Checkpoints, bit-exact resume after SIGKILL/SIGTERM, corrupt checkpoints, config changes on
resume, failing sweep jobs and a full disk. Crashes are real: subprocesses killed at named
points by the test harness (tests/faultinject, SWA_RESEARCH_FAULT)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config, fault_env

import swa_research.training.checkpoint as checkpoint_module
from swa_research.config import UserError
from swa_research.training.build import train
from swa_research.training.checkpoint import LATEST, PREVIOUS, load_checkpoint

# Tiny, with BN (so the BN update of the average runs) and averaging from the middle.
# 231 training images, batch 32: 7 iterations an epoch, 21 in all.
RUN = ["experiment=smoke", *TINY, "data.train_size=256", "model.batch_norm=true",
       "trainer.epochs=3",
       "trainer.deterministic=true", "swa.start=0.4", "swa.freq=2"]
# What varies run to run.
TIMING = ("wall_time_s", "images_per_s", "tokens_per_s", "peak_rss_mb", "peak_gpu_mb", "mfu")


def default_sigint() -> None:
    """Ctrl-C's default in the child: a shell that starts the tests in the background (as
    .ci/run does) has them ignore SIGINT, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(run_dir: Path, extra: list[str] = (), fault: str | None = None,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fault_env(fault)}
    r = subprocess.run(
        [sys.executable, "-m", "swa_research.train", *RUN, *extra,
         f"hydra.run.dir={run_dir}"],
        cwd=cwd or run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=300, preexec_fn=default_sigint)
    r.stderr = r.stdout  # Hydra logs to stdout, errors go to stderr: read them together
    return r


def comparable_metrics(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    for k in TIMING:
        m["train"].pop(k, None)  # images_per_s or tokens_per_s: the task's unit
    return m


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    r = launch(run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def assert_same_as(baseline: Path, run_dir: Path) -> None:
    assert (run_dir / "history.csv").read_bytes() == (baseline / "history.csv").read_bytes()
    assert comparable_metrics(run_dir) == comparable_metrics(baseline)


def kill_and_resume(base: Path, fault: str) -> tuple[subprocess.CompletedProcess[str],
                                                     subprocess.CompletedProcess[str], Path]:
    run_dir = base / fault.replace("@", "_").replace(":", "_")
    killed = launch(run_dir, fault=fault)
    resumed = launch(run_dir)
    return killed, resumed, run_dir


def test_sigterm_checkpoints_exits_for_requeue_and_resumes_identically(
        baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed = launch(run_dir, fault="step@17:TERM")
    assert killed.returncode == 75, killed.stderr[-2000:]
    assert "SIGTERM received" in killed.stderr and "Traceback" not in killed.stderr
    state = load_checkpoint(run_dir / LATEST)
    assert state["iteration"] == 17 and state["partial"]["batch"] == 17 - 14
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "preempted"
    resumed = launch(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert_same_as(baseline, run_dir)


def test_ctrl_c_is_one_line_and_exit_130_and_the_rerun_resumes(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) lands inside the 10th step, which is lost: 9 iterations were done."""
    run_dir = tmp_path / "run"
    r = launch(run_dir, fault="step@10:INT")
    assert r.returncode == 130, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == (
        "interrupted at iteration 9; rerun the same command to resume from its last checkpoint")
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    resumed = launch(run_dir)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]


@pytest.mark.slow
def test_sigusr1_is_handled_like_sigterm(tmp_path: Path) -> None:
    r = launch(tmp_path / "run", fault="step@3:USR1")
    assert r.returncode == 75 and "SIGUSR1 received" in r.stderr
    assert load_checkpoint(tmp_path / "run" / LATEST)["iteration"] == 3


@pytest.mark.slow  # the SIGTERM test above kills and resumes identically in the default run
def test_sigkill_mid_epoch_then_resume_is_identical(baseline: Path, tmp_path: Path) -> None:
    killed, resumed, run_dir = kill_and_resume(tmp_path, "step@20")
    assert killed.returncode == -9
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_as(baseline, run_dir)


@pytest.mark.slow
def test_sigkill_at_five_points_then_resume_is_identical(baseline: Path, tmp_path: Path
                                                         ) -> None:
    faults = ["step@12",              # mid-epoch
              "eval@2",               # during the second evaluation
              "bn_update@2",          # during a BN update of the average
              "checkpoint_write@2",   # a checkpoint half written
              "averaged@1"]           # right after averaging starts
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda f: kill_and_resume(tmp_path, f), faults))
    for fault, (killed, resumed, run_dir) in zip(faults, results, strict=True):
        assert killed.returncode == -9, (fault, killed.stderr[-1500:])
        assert resumed.returncode == 0, (fault, resumed.stderr[-1500:])
        assert_same_as(baseline, run_dir)
        assert not list(run_dir.glob(".*staged*")) or fault == "checkpoint_write@2"


def test_a_half_written_checkpoint_never_replaces_the_good_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = launch(run_dir, fault="checkpoint_write@2")
    assert r.returncode == -9
    # The first checkpoint (epoch 1) is still the newest complete one.
    assert load_checkpoint(run_dir / LATEST)["epoch"] == 1


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert launch(run_dir, fault="step@16:TERM").returncode == 75  # epochs 1, 2 and a partial
    assert load_checkpoint(run_dir / PREVIOUS)["epoch"] == 2
    data = (run_dir / LATEST).read_bytes()
    (run_dir / LATEST).write_bytes(data[: len(data) // 2])  # truncated
    r = launch(run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"checkpoint {run_dir / LATEST} is corrupt or truncated" in r.stderr
    assert f"resuming from {run_dir / PREVIOUS}" in r.stderr


def test_resume_from_a_corrupt_path_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = launch(tmp_path / "run", [f"trainer.resume={bad}"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: checkpoint") and str(bad) in lines[-1]
    assert "corrupt or truncated" in lines[-1]


def test_resume_with_another_config_names_the_keys_and_refuses(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert launch(run_dir, fault="step@5:TERM").returncode == 75
    r = launch(run_dir, ["swa.lr=0.01", "model.dropout=0.2"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    msg = r.stderr.strip().splitlines()[-1]
    assert "swa.lr: 0.003 -> 0.01" in msg and "model.dropout: 0.1 -> 0.2" in msg
    assert "trainer.resume_override=true" in msg
    r = launch(run_dir, ["swa.lr=0.01", "model.dropout=0.2", "trainer.resume_override=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr


@pytest.mark.slow
def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    assert launch(src, fault="step@5:TERM").returncode == 75
    ckpt = src / LATEST
    r = launch(tmp_path / "other", ["model=vgg11", f"trainer.resume={ckpt}"])
    assert r.returncode == 2 and "model.name: simplified -> vgg11" in r.stderr
    r = launch(tmp_path / "other2", ["model=vgg11", f"trainer.resume={ckpt}",
                                     "trainer.resume_override=true"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"checkpoint {ckpt} does not fit this model" in r.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # tests/test_cli.py: the finished_run_dir case
def test_a_finished_run_dir_is_never_overwritten(baseline: Path) -> None:
    before = (baseline / "metrics.json").read_bytes()
    r = launch(baseline)
    assert r.returncode == 2 and "already holds a finished run" in r.stderr
    assert (baseline / "metrics.json").read_bytes() == before


@pytest.mark.slow  # a diverged run: tests/test_run_dir_safety.py; a multirun: tests/test_cli.py
def test_nan_job_in_a_three_job_multirun(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "swa_research.train", "-m", "experiment=smoke", *TINY,
         "optimizer=sgd", "optimizer.lr=0.01,1e12,0.02", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=300)
    assert r.returncode == 1
    statuses = [json.loads((sweep / str(i) / "metrics.json").read_text())["status"]
                for i in range(3)]
    assert statuses == ["finished", "diverged", "finished"]
    summary = r.stderr[r.stderr.index(f"sweep {sweep}"):]
    assert "3 jobs, 2 finished, 1 not finished" in summary
    assert "diverged" in summary and "optimizer.lr=1000000000000.0" in summary


def test_full_disk_at_checkpoint_time_stops_cleanly(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = checkpoint_module.atomic_write
    calls = {"n": 0}

    def write_then_fill_the_disk(path, write, binary=True):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, write, binary)

    monkeypatch.setattr(checkpoint_module, "atomic_write", write_then_fill_the_disk)
    cfg = compose_config([*RUN])
    with pytest.raises(UserError, match="no space left on device writing .*last good checkpoint"):
        train(cfg, tmp_path)
    state = load_checkpoint(tmp_path / LATEST)
    assert state["epoch"] == 1
    assert not list(tmp_path.glob(f".{LATEST}.staged*"))
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
    assert torch.is_tensor(state["rng"]["torch"])


def test_a_key_added_after_a_checkpoint_compares_as_its_old_behaviour() -> None:
    """A checkpoint written before swa.also existed kept no further averages: against the
    default ([]) that is no difference, against [ema] it is. A retired key
    (trainer.conv_algorithm, CPU kernels since removed) in an old checkpoint is no difference.
    Keys absent from both sides are not invented."""
    from swa_research.training.checkpoint import config_differences

    saved = {"trainer": {"epochs": 3, "conv_algorithm": "winograd"}, "swa": {"lr": 0.1}}
    current = {"trainer": {"epochs": 3, "compile_mode": "default"},
               "swa": {"lr": 0.1, "also": []}}
    assert config_differences(saved, current) == []
    current["swa"]["also"] = ["ema"]
    assert config_differences(saved, current) == ["swa.also: [] -> ['ema']"]
    assert config_differences(saved, {"trainer": {"epochs": 3}, "swa": {"lr": 0.1}}) == []


def test_a_checkpoint_from_before_the_split_seed_compares_with_its_training_seed() -> None:
    """Before data.split_seed the validation split was drawn with the training seed: a
    seed-0 run resumes with the default split seed 0, a seed-3 run is told the key to set."""
    from swa_research.training.checkpoint import config_differences

    for seed, expected in ((0, []), (3, ["data.split_seed: 3 -> 0"])):
        saved = {"seed": seed, "data": {"val_fraction": 0.1}}
        current = {"seed": seed, "data": {"val_fraction": 0.1, "split_seed": 0}}
        assert config_differences(saved, current) == expected


def test_a_checkpoint_from_before_the_language_model_and_fge_keys_resumes() -> None:
    """A default run's config without the keys added since 0.2.0's task seam (language
    models, schedule-free AdamW, FGE, trainer.init_weights, trainer.peak_tflops): no
    difference, so its checkpoint resumes."""
    from omegaconf import OmegaConf

    from swa_research.config import Config, flatten_dict
    from swa_research.training.checkpoint import config_differences

    current = OmegaConf.to_container(OmegaConf.structured(Config))
    added = {"data": ("tokenizer", "pattern", "test_fraction", "windows_per_epoch",
                      "eval_tokens"),
             "optimizer": ("no_decay", "grad_clip", "weight_lr_power", "r"),
             "schedule": ("warmup", "cooldown", "cooldown_shape", "fge_cycle", "fge_lr_high"),
             "swa": ("lawa_k",), "trainer": ("grad_accum", "init_weights", "peak_tflops")}
    saved = {g: {k: v for k, v in node.items() if k not in added.get(g, ())}
             if isinstance(node, dict) else node for g, node in current.items()}
    assert len(flatten_dict(saved)) == len(flatten_dict(current)) - 18
    assert config_differences(saved, current) == []
    current["trainer"]["grad_accum"] = 4
    assert config_differences(saved, current) == ["trainer.grad_accum: 1 -> 4"]
