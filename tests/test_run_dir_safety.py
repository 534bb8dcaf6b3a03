"""A run dir's record stays true: metrics.json is the commit point, one process per run dir,
a refused command rewrites nothing, unreadable checkpoints stop the run, checkpoints load
without running code, and a full disk is named. Faults are injected by patching inside the
test's own subprocess (``HARNESS``), not by hooks in the product."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config

import swa_research.fileio as fileio
from swa_research.config import UserError
from swa_research.locks import RunDirLock
from swa_research.tracking.loggers import WANDB_ID_FILE, run_id_for
from swa_research.training.build import train
from swa_research.training.checkpoint import (
    LATEST,
    PREVIOUS,
    find_resume_checkpoint,
    load_checkpoint,
)

# 7 iterations an epoch (231 training images, batch 32), 3 epochs, averaging from the middle.
RUN = ["experiment=smoke", *TINY, "data.train_size=256", "model.batch_norm=true",
       "trainer.epochs=3", "trainer.deterministic=true", "swa.start=0.4", "swa.freq=2"]
WEIGHTS = ("sgd_final.pt", "sgd_best_val.pt", "swa.pt")

# Runs the entry point after the patch given in SWA_TEST_PATCH (Python source) is applied.
HARNESS = """
import os, signal, sys
exec(os.environ.get("SWA_TEST_PATCH", ""))
from swa_research.train import main
sys.argv[0] = "swa-train"
main()
"""


def launch(run_dir: Path, extra: list[str] = (), patch: str = "",
           wait: bool = True) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWA_TEST_PATCH": patch}
    for key in ("HYDRA_FULL_ERROR", "SWA_RUN_ID", "SWA_RESEARCH_FAULT"):
        env.pop(key, None)
    cmd = [sys.executable, "-c", HARNESS, *RUN, *extra, f"hydra.run.dir={run_dir}"]
    if not wait:
        return subprocess.Popen(cmd, cwd=run_dir.parent, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    r = subprocess.run(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300)
    r.stderr = r.stdout
    return r


def status(run_dir: Path) -> str | None:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text())["status"] if path.is_file() else None


def record(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / ".hydra").iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    r = launch(run_dir, ["trainer.keep_checkpoint=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir


def test_a_finished_run_keeps_only_what_was_asked(finished: Path, tmp_path: Path) -> None:
    assert (finished / LATEST).is_file() and not (finished / PREVIOUS).exists()
    train(compose_config([*RUN, "trainer.epochs=2"]), tmp_path)
    assert not (tmp_path / LATEST).exists() and not (tmp_path / PREVIOUS).exists()


def test_metrics_json_lists_the_files_written_before_it(finished: Path) -> None:
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["files"] == list(WEIGHTS)
    newest_weight = max((finished / n).stat().st_mtime_ns for n in WEIGHTS)
    assert (finished / "metrics.json").stat().st_mtime_ns >= newest_weight


# -- 1. a kill between the weights and metrics.json --------------------------------------------
KILL_AFTER_FIRST_WEIGHTS = """
import swa_research.tracking.outputs as t
_save = t.atomic_torch_save
def save(obj, path):
    _save(obj, path)
    os.kill(os.getpid(), signal.SIGKILL)
t.atomic_torch_save = save
"""


# Slow, as is the next: in the default run, the weights written before metrics.json are checked
# above and a rerun completing them from the checkpoint by the full-disk test below.
@pytest.mark.slow
def test_kill_while_writing_weights_then_rerun_completes_the_run(finished: Path,
                                                                 tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed = launch(run_dir, patch=KILL_AFTER_FIRST_WEIGHTS)
    assert killed.returncode == -9
    assert status(run_dir) != "finished"  # not committed
    assert (run_dir / "sgd_final.pt").is_file() and not (run_dir / "swa.pt").is_file()
    again = launch(run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert status(run_dir) == "finished"
    assert all((run_dir / n).is_file() for n in WEIGHTS)
    assert (run_dir / "history.csv").read_bytes() == (finished / "history.csv").read_bytes()
    a = torch.load(run_dir / "swa.pt", weights_only=True)["state_dict"]
    b = torch.load(finished / "swa.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_a_finished_run_that_lost_a_weights_file_is_completed_from_its_checkpoint(
        finished: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for p in finished.iterdir():
        if p.is_file():
            (run_dir / p.name).write_bytes(p.read_bytes())
    (run_dir / ".hydra").mkdir()
    for name, data in record(finished).items():
        (run_dir / ".hydra" / name).write_bytes(data)
    (run_dir / "swa.pt").unlink()
    r = launch(run_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "completing them from" in r.stderr
    a = torch.load(run_dir / "swa.pt", weights_only=True)["state_dict"]
    b = torch.load(finished / "swa.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    # Complete now: the next rerun is refused.
    assert launch(run_dir).returncode == 2


# -- 2. one process per run dir ----------------------------------------------------------------
HOLD_THE_LOCK = """
import swa_research.training.trainer as t
_fit = t.Trainer.fit
def fit(self):
    print("holding", flush=True)
    import time
    time.sleep(600)
t.Trainer.fit = fit
"""


@pytest.mark.slow  # the lock alone, in the default run: the next test
def test_a_second_process_in_a_locked_run_dir_is_refused_and_a_dead_holder_is_taken_over(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = launch(run_dir, patch=HOLD_THE_LOCK, wait=False)
    try:
        assert first.stdout is not None
        deadline = time.monotonic() + 120
        for line in first.stdout:
            if "holding" in line or time.monotonic() > deadline:
                break
        before = record(run_dir)
        second = launch(run_dir, ["seed=1"])
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: run dir {run_dir} is in use by pid {first.pid} "
                               f"on host {socket.gethostname()}"), second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        assert record(run_dir) == before  # the first run's record, untouched
    finally:
        first.kill()
        first.wait()
    third = launch(run_dir)  # the dead holder's lock is taken over
    assert third.returncode == 0, third.stderr[-2000:]
    assert status(run_dir) == "finished"


def _hold_run_dir(run_dir: str, held: mp.Event) -> None:
    with RunDirLock(run_dir):
        held.set()
        time.sleep(600)


def test_run_dir_lock_names_its_holder_and_outlives_it(tmp_path: Path) -> None:
    """The lock alone, in-process: the holder's line survives a refused attempt, a second lock
    in the holder's own process is refused too, and a killed holder's lock is taken over."""
    ctx = mp.get_context("fork")
    held = ctx.Event()
    holder = ctx.Process(target=_hold_run_dir, args=(str(tmp_path), held))
    holder.start()
    try:
        assert held.wait(60)
        line = (tmp_path / RunDirLock.NAME).read_text()
        assert line.startswith(f"pid {holder.pid} on host {socket.gethostname()} (since ")
        for _ in range(2):  # the refusal leaves the holder's line for the next one
            with pytest.raises(UserError) as refused:
                RunDirLock(tmp_path).acquire()
            assert str(refused.value) == (
                f"run dir {tmp_path} is in use by {line.strip()}; wait for it to end, or "
                "choose another output dir with hydra.run.dir=...")
            assert (tmp_path / RunDirLock.NAME).read_text() == line
    finally:
        holder.kill()
        holder.join(60)
    with RunDirLock(tmp_path):
        mine = f"pid {os.getpid()} on host {socket.gethostname()} (since "
        assert (tmp_path / RunDirLock.NAME).read_text().startswith(mine)
        with pytest.raises(UserError, match=f"is in use by pid {os.getpid()} "):
            RunDirLock(tmp_path).acquire()
    assert (tmp_path / RunDirLock.NAME).read_text().startswith(mine)  # kept after release
    with RunDirLock(tmp_path):  # released: free again
        pass


# -- 3. a refused command never rewrites the record --------------------------------------------
@pytest.mark.parametrize("extra", [
    ["optimizer.lr=0.5"],  # refused by the job
    pytest.param(["model=vgg11"], marks=pytest.mark.slow),
    pytest.param(["swa.start=nan"], marks=pytest.mark.slow),
    ["+trainer.epoch=100"]])  # refused while Hydra composes the config
def test_a_refused_command_leaves_the_record_of_a_finished_run(finished: Path,
                                                               extra: list[str]) -> None:
    before = record(finished)
    metrics = (finished / "metrics.json").read_bytes()
    r = launch(finished, extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert record(finished) == before
    assert (finished / "metrics.json").read_bytes() == metrics


@pytest.mark.slow  # tests/test_reliability.py: a resume with another config is refused
def test_a_refused_resume_leaves_the_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert launch(run_dir, patch=SIGTERM_AT_ITERATION.format(n=5)).returncode == 75
    before = record(run_dir)
    r = launch(run_dir, ["swa.lr=0.01"])
    assert r.returncode == 2 and "another config" in r.stderr
    assert record(run_dir) == before
    ok = launch(run_dir, ["swa.lr=0.01", "trainer.resume_override=true"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "swa.lr=0.01" in (run_dir / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow  # tests/test_cli.py: the start_beyond_budget case checks the failed record
def test_a_new_run_dir_records_a_refused_config_and_why(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    r = launch(run_dir, ["swa.start=100000"])
    assert r.returncode == 2
    assert "swa.start=100000" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "beyond the training budget" in metrics["error"]
    assert "swa.start=0.75" in metrics["error"]


# -- 5. every checkpoint unreadable ------------------------------------------------------------
SIGTERM_AT_ITERATION = """
import swa_research.tracking.progress as t
_update = t.Progress.update
def update(self, epoch, epochs, done, loss_sum, seen):
    _update(self, epoch, epochs, done, loss_sum, seen)
    global _n
    _n = globals().get("_n", 0) + 1
    if _n == {n}:
        os.kill(os.getpid(), signal.SIGTERM)
t.Progress.update = update
"""


@pytest.mark.slow  # a corrupt checkpoint stops with one line: tests/test_reliability.py
def test_both_checkpoints_corrupt_stops_and_touches_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert launch(run_dir, patch=SIGTERM_AT_ITERATION.format(n=16)).returncode == 75
    for name in (LATEST, PREVIOUS):
        data = (run_dir / name).read_bytes()
        (run_dir / name).write_bytes(data[: len(data) // 3])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    r = launch(run_dir)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert str(run_dir / LATEST) in last and str(run_dir / PREVIOUS) in last
    assert "trainer.resume=never" in last
    skip = ("train.log", ".lock")  # the refusal's log line; who held the lock last
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()
            and p.name not in skip} == {k: v for k, v in before.items() if k not in skip}
    fresh = launch(run_dir, ["trainer.resume=never"])
    assert fresh.returncode == 0, fresh.stderr[-2000:]


# -- 6. a fresh W&B id per run -----------------------------------------------------------------
def test_wandb_run_id_is_new_per_run_and_kept_on_resume(tmp_path: Path) -> None:
    first = run_id_for(tmp_path, resuming=False)
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert run_id_for(tmp_path, resuming=True) == first
    second = run_id_for(tmp_path, resuming=False)  # a new run in a reused dir
    assert second != first
    other = tmp_path / "other"
    other.mkdir()
    assert run_id_for(other, resuming=True) not in (first, second)  # nothing kept there


# -- 7. checkpoints load without running code --------------------------------------------------
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["auto", "path"])
def test_a_malicious_checkpoint_is_refused_without_running(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / LATEST
    with open(ckpt, "wb") as f:
        pickle.dump({"format": 2, "payload": _RunsCode(marker)}, f, protocol=2)
    # torch.save's zip format too: the payload pickled inside the archive.
    zipped = tmp_path / "zipped.pt"
    torch.save({"payload": _RunsCode(marker)}, zipped)
    for path in (ckpt, zipped):
        with pytest.raises(UserError, match="refused, as loading it could run code"):
            find_resume_checkpoint(tmp_path, "auto" if how == "auto" and path == ckpt
                                   else str(path))
    assert not marker.exists()


def test_a_checkpoint_loads_with_weights_only(finished: Path) -> None:
    state = load_checkpoint(finished / LATEST)
    assert state["epoch"] == 3 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


# -- 8. full disk, stale temporaries, an early SIGTERM -----------------------------------------
class _FullDisk:
    """A file whose writes fail with ENOSPC, as on a full disk."""

    def __init__(self, f) -> None:  # noqa: ANN001
        self._f = f

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._f, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def test_full_disk_writing_the_weights_names_the_file_and_a_rerun_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", **kw):  # noqa: ANN001, ANN202
        f = real_fdopen(fd, mode, **kw)
        return _FullDisk(f) if ".sgd_final.pt." in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)
    with pytest.raises(UserError) as info:
        train(compose_config(RUN), tmp_path)
    assert str(info.value).startswith(f"no space left on device writing {tmp_path}/sgd_final.pt")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "no space left" in metrics["error"]
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "sgd_final.pt").exists()
    monkeypatch.setattr(fileio.os, "fdopen", real_fdopen)
    done = train(compose_config(RUN), tmp_path)  # completes from the checkpoint
    assert done["status"] == "finished" and (tmp_path / "sgd_final.pt").is_file()


def test_stale_temporaries_are_removed_at_the_next_start(tmp_path: Path) -> None:
    stale = [tmp_path / ".checkpoint.pt.staged", tmp_path / ".checkpoint.pt.staged.x1y2.tmp",
             tmp_path / ".history.csv.abc123.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    train(compose_config([*RUN, "trainer.epochs=1"]), tmp_path)
    assert not any(p.exists() for p in stale)


SIGTERM_WHILE_LOADING = """
from swa_research.tasks import Task
_build = Task.build_data
def build(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    return _build(*a, **k)
Task.build_data = build
"""


def test_sigterm_before_the_training_loop_exits_for_a_requeue(tmp_path: Path) -> None:
    r = launch(tmp_path / "run", patch=SIGTERM_WHILE_LOADING)
    assert r.returncode == 75, r.stderr[-2000:]
    assert "SIGTERM received before training started" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_diverged_run_ends_with_one_line(tmp_path: Path) -> None:
    r = launch(tmp_path / "run", ["optimizer=sgd", "optimizer.lr=1e12"])
    assert r.returncode == 1
    assert "Error executing job" not in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: training loss became")
    assert status(tmp_path / "run") == "diverged"


@pytest.mark.parametrize("keep", [False, True])
def test_a_rerun_removes_checkpoints_a_kill_after_metrics_left(
        tmp_path: Path, keep: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Killed between metrics.json and the removal of the checkpoints: the rerun removes them
    (checkpoint.pt stays with trainer.keep_checkpoint=true), says so, and refuses the dir as
    finished."""
    from conftest import TINY, compose_config
    from omegaconf import OmegaConf

    from swa_research.config import UserError
    from swa_research.training.build import train
    from swa_research.training.checkpoint import LATEST, PREVIOUS

    cfg = compose_config([*TINY, f"trainer.keep_checkpoint={str(keep).lower()}"])
    train(cfg, tmp_path)
    (tmp_path / ".hydra").mkdir()  # the record the entry point writes
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    for name in (LATEST, PREVIOUS):  # what the kill left
        (tmp_path / name).write_bytes(b"left behind")
    before = (tmp_path / "metrics.json").read_bytes()
    rerun = compose_config([*TINY])  # the rerun's own keep_checkpoint does not decide
    with pytest.raises(UserError, match="already holds a finished run"):
        train(rerun, tmp_path)
    assert not (tmp_path / PREVIOUS).exists()
    assert (tmp_path / LATEST).exists() is keep
    removed = "checkpoint.prev.pt" if keep else "checkpoint.prev.pt and checkpoint.pt"
    assert f"removed {removed}, left by a run killed after it finished" in caplog.text
    assert (tmp_path / "metrics.json").read_bytes() == before


SIGTERM_WHILE_WRITING = """
import swa_research.training.trainer as t
_save = t.Trainer.save_weights
def save(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return _save(self)
t.Trainer.save_weights = save
"""


def test_sigterm_while_the_results_are_written_says_so_and_the_rerun_completes(
        tmp_path: Path) -> None:
    r = launch(tmp_path / "run", patch=SIGTERM_WHILE_WRITING)
    assert r.returncode == 75, r.stderr[-2000:]
    assert "SIGTERM received after training, while the run's results were being written" \
        in r.stderr
    assert "before training started" not in r.stderr and "Traceback" not in r.stderr
    r = launch(tmp_path / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert status(tmp_path / "run") == "finished"
