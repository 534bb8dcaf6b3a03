"""Scale-out: multiruns through hydra-submitit-launcher (local) and hydra-joblib-launcher, a
preempted submitit job that is requeued and resumes, the Optuna preset, GPU claims and
concurrent data preparation."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, fault_env
from PIL import Image

from swa_research.locks import GpuClaim

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher")

FAST = [*TINY, "experiment=smoke"]


def run_cli(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None,
            split_stderr: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    for k in ("SWA_RUN_ID", "SWA_RESEARCH_FAULT", "HYDRA_FULL_ERROR"):
        if k not in (extra_env or {}):
            env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "swa_research.train", *args], cwd=cwd, env=env,
                       stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE if split_stderr else subprocess.STDOUT, text=True,
                       timeout=600)
    return r


def finished_jobs(sweep: Path, n: int) -> list[dict]:
    out = []
    for i in range(n):
        m = json.loads((sweep / str(i) / "metrics.json").read_text())
        assert m["status"] == "finished"
        out.append(m)
    return out


@pytest.mark.slow  # the default run has a multirun on the basic launcher (tests/test_cli.py)
@pytest.mark.parametrize("launcher", ["submitit_local", "joblib"])
def test_two_job_multirun_on_a_launcher(launcher: str, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    r = run_cli(["-m", f"hydra/launcher={launcher}", *extra, *FAST, "seed=0,1",
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    metrics = finished_jobs(sweep, 2)
    assert metrics[0]["sgd"] != metrics[1]["sgd"]  # two seeds, two runs
    # The sweep summary is the same whichever launcher ran the jobs.
    assert f"sweep {sweep}: 2 jobs, 2 finished, 0 not finished" in r.stdout


@pytest.mark.slow  # kill and resume: tests/test_reliability.py (SIGTERM, exit 75, identical)
def test_preempted_submitit_job_is_requeued_and_resumes(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # The job sends itself submitit's preemption signal at its 20th step, once.
    env = fault_env("step@20:USR2", once=tmp_path / "fired")
    r = run_cli(["-m", "hydra/launcher=submitit_local", *FAST, "data.train_size=256",
                 "trainer.epochs=3", "trainer.deterministic=true", "seed=0",
                 f"hydra.sweep.dir={sweep}"], tmp_path, env)
    assert r.returncode == 0, r.stdout[-3000:]
    assert (tmp_path / "fired").exists()
    (m,) = finished_jobs(sweep, 1)
    log = (sweep / "0" / "train.log").read_text()
    assert "SIGUSR2 received" in log and "exiting with status 75" in log
    assert "resumed at iteration 20" in log  # not started over
    submitit_logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "Requeued" in submitit_logs or "requeue" in submitit_logs.lower()
    # The resumed run equals an uninterrupted one.
    ref = tmp_path / "ref"
    r2 = run_cli([*FAST, "data.train_size=256", "trainer.epochs=3",
                  "trainer.deterministic=true", "seed=0", f"hydra.run.dir={ref}"], tmp_path)
    assert r2.returncode == 0, r2.stdout[-3000:]
    assert (ref / "history.csv").read_bytes() == (sweep / "0" / "history.csv").read_bytes()
    assert m["sgd"] == json.loads((ref / "metrics.json").read_text())["sgd"]


@pytest.mark.slow
def test_optuna_preset_searches_and_reports_the_best(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    tiny = [o for o in FAST if not o.startswith("swa.start=")]  # searched, not fixed
    r = run_cli(["hparams_search=optuna_swa", *tiny, "hydra.sweeper.n_trials=2",
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:]
    metrics = finished_jobs(sweep, 2)
    import yaml

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optimizer.lr", "swa.lr", "swa.start"}
    assert result["best_value"] == max(m["swa"]["val_acc"] for m in metrics)


@pytest.mark.slow
def test_optuna_study_in_sqlite_is_continued_by_a_rerun(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    db = tmp_path / "study.db"
    storage = f"sqlite:///{db}"
    tiny = [o for o in FAST if not o.startswith("swa.start=")]  # searched, not fixed
    # The same command twice: each gets a sweep dir of its own (outputs/multirun/<run id>), and
    # the second continues the study in the sqlite file instead of starting a new one.
    cmd = ["-m", "hparams_search=optuna_swa", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.n_jobs=1", f"hydra.sweeper.storage={storage}",
           "hydra.sweeper.study_name=persisted", *tiny]
    for n_trials in (2, 4):
        r = run_cli(cmd, tmp_path, split_stderr=True)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        study = optuna.load_study(study_name="persisted", storage=storage)
        trials = study.get_trials()
        assert len(trials) == n_trials
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir(), key=os.path.getmtime)
        assert len(sweeps) == n_trials // 2
        results = sweeps[-1].relative_to(tmp_path) / "optimization_results.yaml"
        assert (tmp_path / results).is_file()
        # The last stderr lines: the whole study's best (earlier commands' trials included)
        # and where the sweeper wrote it.
        last = r.stderr.strip().splitlines()[-3:]
        assert study.best_value == max(t.value for t in trials)
        assert last[0] == f"Optuna best value: {study.best_value}"
        assert last[1] == "Optuna best parameters: " + " ".join(
            f"{k}={v}" for k, v in study.best_params.items())
        assert set(study.best_params) == {"optimizer.lr", "swa.lr", "swa.start"}
        assert last[2] == f"Optuna results: {results}"
        # No plugin-setup or migration chatter from alembic (imported by optuna).
        assert "setup plugin" not in out
        assert "alembic" not in out.lower() and "Context impl" not in out


def _hold_gpu(count: int, preferred: int, lock_dir: str, hold_s: float, q: mp.Queue) -> None:
    claim = GpuClaim.acquire(count, preferred, lock_dir, poll_s=0.05)
    q.put((preferred, claim.index, time.monotonic()))
    time.sleep(hold_s)
    claim.release()


def test_jobs_sharing_a_machine_take_different_gpus(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    # Two GPUs, three jobs that all prefer GPU 0: two run at once on different GPUs, the
    # third waits until one is free.
    procs = [ctx.Process(target=_hold_gpu, args=(2, 0, str(tmp_path), 1.5, q))
             for _ in range(3)]
    for p in procs:
        p.start()
    got = sorted((q.get(timeout=60) for _ in procs), key=lambda t: t[2])
    for p in procs:
        p.join(timeout=60)
    assert {got[0][1], got[1][1]} == {0, 1}
    assert got[2][2] - got[0][2] >= 1.0  # the third had to wait for a release
    # In one process: a claim is released and can be taken again; a busy set times out.
    a = GpuClaim.acquire(1, 0, tmp_path)
    with pytest.raises(TimeoutError):
        GpuClaim.acquire(1, 0, tmp_path, poll_s=0.05, timeout_s=0.2)
    a.release()
    GpuClaim.acquire(1, 0, tmp_path).release()


def test_concurrent_cache_builds_give_one_valid_cache(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 40), ("test", 10)):
        for c in ("a", "b"):
            for i in range(n):
                px = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(px.numpy()).save(root / split / c / f"{i}.png")
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
            "from swa_research.config import DataConfig\n"
            "from swa_research.data import load_datasets\n"
            f"tr, te, cl = load_datasets(DataConfig(name='imagefolder', root='{root}'), 1)\n"
            "print('SHAPES', tuple(tr.images.shape), tuple(te.images.shape), int(tr.images.sum()))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    shapes = {line for out in outs for line in out.splitlines() if line.startswith("SHAPES")}
    assert len(shapes) == 1  # both processes got the same images
    decodes = sum(len(re.findall(r"decoding \d+ images", out)) for out in outs)
    assert decodes == 2  # train and test decoded once in all, not once per process
    caches = sorted(p.name for p in (root / ".swa_cache").iterdir())
    assert len(caches) == 2 and all(c.endswith(".pt") for c in caches)
    blob = torch.load(root / ".swa_cache" / caches[1], weights_only=True)
    assert blob["images"].dtype == torch.uint8 and blob["images"].shape[0] == 80


def test_local_gpus_runs_one_job_per_visible_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    monkeypatch.delenv("SWA_NUM_GPUS", raising=False)
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="swa_research.conf", version_base="1.3"):
            cfg = compose("config", overrides=["hydra/launcher=local_gpus"],
                          return_hydra_config=True)
        assert OmegaConf.select(cfg, "hydra.launcher.n_jobs") == 3
        monkeypatch.setenv("SWA_NUM_GPUS", "2")
        assert int(OmegaConf.select(cfg, "hydra.launcher.n_jobs")) == 2
    finally:
        GlobalHydra.instance().clear()
