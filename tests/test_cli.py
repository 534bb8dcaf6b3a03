"""The command line, ``python -m swa_research.train``: a run, a multirun and a few mistakes in
subprocesses, and one clean line on stderr with exit code 2 for every mistake a user can make
(in this process through ``main()``, for speed)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import swa_research.train as train_module
from swa_research.tracking.callbacks import SWEEP

# Shrinks the smoke preset further; the CLI tests are about the process, not the learning.
FAST = ["data.train_size=128", "data.test_size=64", "trainer.epochs=2", "trainer.device=cpu"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    for key in ("HYDRA_FULL_ERROR", "SWA_RUN_ID", "SWA_DATA_ROOT"):
        e.pop(key, None)
    e["OMP_NUM_THREADS"] = "1"  # several of these run at once on two cores
    return e


def cli(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None,
        entry: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *(entry or ["-m", "swa_research.train"]), *args]
    return subprocess.run(cmd, cwd=cwd, env={**env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=300)


# (id, command-line arguments, words the one-line message must contain). {tmp} is the test's
# temporary folder; each case also gets its own hydra.run.dir unless it sets one.
ERROR_CASES: list[tuple[str, list[str], list[str]]] = [
    ("unknown_key", ["foo=1"], ["foo"]),
    ("appended_typo", ["+trainer.epoch=100"], ["trainer.epoch:", "did you mean trainer.epochs"]),
    ("start_nan", ["swa.start=nan"], ["swa.start=nan", "fraction"]),
    ("wrong_type", ["trainer.epochs=abc"], ["trainer.epochs", "abc"]),
    ("unknown_option", ["model=foo"], ["model/foo", "vgg16"]),
    ("negative_lr", ["optimizer.lr=-1"], ["optimizer.lr", "positive"]),
    ("foreign_model_option", ["model=vgg16", "+model.depth=3"],
     ["model.depth: not an option of model vgg16", "batch_norm, dropout, width"]),
    ("unknown_method", ["swa.method=polyak"],
     ["swa.method='polyak'", "swag_diag, lawa, fge, power_ema, none"]),
    ("zero_batch", ["trainer.batch_size=0"], ["trainer.batch_size", "positive"]),
    ("start_beyond_budget", ["experiment=smoke", "swa.start=100000"],
     ["swa.start=100000", "budget", "trainer.epochs"]),
    ("imagefolder_without_root", ["data=imagefolder"], ["data.root"]),
    ("root_missing", ["data=imagefolder", "data.root={tmp}/nope"],
     ["data.root", "/nope", "does not exist"]),
    ("root_without_train", ["data=imagefolder", "data.root={tmp}/empty"],
     ["data.root", "train/"]),
    ("output_not_writable", ["experiment=smoke", "hydra.run.dir={tmp}/a_file/run"],
     ["a_file", "hydra.run.dir"]),
    ("cifar_missing", ["data=cifar10", "data.root={tmp}/nocifar", "data.download=false"],
     ["CIFAR-10", "{tmp}/nocifar/cifar-10-batches-py", "data.download=false", "data.root"]),
    ("no_gpu", ["experiment=smoke", "trainer.device=cuda"], ["trainer.device=cuda", "GPU"]),
    ("folder_without_images", ["data=imagefolder", "data.root={tmp}/noimg"],
     ["{tmp}/noimg/train", "no images"]),
    ("class_missing_from_test", ["data=imagefolder", "data.root={tmp}/missing_class"],
     ["{tmp}/missing_class/test", "missing: b"]),
    ("unreadable_image", ["data=imagefolder", "data.root={tmp}/badimg"],
     ["cannot read image", "{tmp}/badimg/train/a/bad.jpg"]),
    ("one_class", ["data=imagefolder", "data.root={tmp}/oneclass", "trainer.batch_size=32"],
     ["{tmp}/oneclass/train", "one class only", "at least two"]),
    ("corrupt_cifar", ["data=cifar10", "data.root={tmp}/badcifar", "data.download=false"],
     ["CIFAR-10", "corrupt", "{tmp}/badcifar/cifar-10-batches-py"]),
    ("finished_run_dir", ["experiment=smoke", "hydra.run.dir={tmp}/finished"],
     ["{tmp}/finished", "already holds a finished run"]),
]
# Also run as real processes: a mistake found while Hydra composes the config, and one found
# by the job itself (its sys.exit inside Hydra's run_job); the interpreter's exit status counts.
SUBPROCESS_CASES = ("unknown_key", "start_beyond_budget")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "a_file").write_text("a regular file, not a folder")
    (tmp / "empty").mkdir()

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 10, 10)).save(path)

    for split in ("train", "test"):
        (tmp / "noimg" / split / "a").mkdir(parents=True)
    image(tmp / "missing_class" / "train" / "a" / "0.png")
    image(tmp / "missing_class" / "train" / "b" / "0.png")
    image(tmp / "missing_class" / "test" / "a" / "0.png")
    image(tmp / "badimg" / "train" / "a" / "0.png")
    (tmp / "badimg" / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    image(tmp / "badimg" / "train" / "b" / "0.png")
    image(tmp / "badimg" / "test" / "a" / "0.png")
    image(tmp / "badimg" / "test" / "b" / "0.png")
    for i in range(40):
        image(tmp / "oneclass" / "train" / "a" / f"{i}.png")
    image(tmp / "oneclass" / "test" / "a" / "0.png")
    cifar = tmp / "badcifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch", "batches.meta"):
        (cifar / name).write_bytes(b"garbage")
    (tmp / "finished").mkdir()
    finished = {"status": "finished", "sgd": {"test_acc": 0.5}}
    (tmp / "finished" / "metrics.json").write_text(json.dumps(finished))
    return tmp


Proc = subprocess.CompletedProcess[str]
ENTRY_SCRIPT = ["-c", "import sys; from swa_research.train import main; "
                      "sys.argv[0] = 'swa-train'; main()"]

# A fresh interpreter that has not imported swa_research.train: Hydra's compose API alone.
COMPOSE_SCRIPT = ["-c", """
from hydra import compose, initialize_config_module
from swa_research.config import to_config
with initialize_config_module(config_module="swa_research.conf", version_base="1.3"):
    cfg = compose("config", overrides=["experiment=smoke"])
print(to_config(cfg).data.name)
"""]


@pytest.fixture(scope="module")
def jobs(workdir: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Future[Proc]]]:
    """The commands of the tests selected in this file, started at once in the background on
    first use; each test waits for its own. The two concurrent multiruns go first so that they
    start together, then the mistakes run as processes (their test comes first, and checks the
    other mistakes in this process meanwhile)."""
    runs = workdir / "runs"
    concurrent = workdir / "concurrent"
    concurrent.mkdir()
    selected = {item.name for item in request.session.items}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures: dict[str, Future[Proc]] = {}

        def submit(key: str, test: str, *args: Any) -> None:
            if test in selected:
                futures[key] = pool.submit(cli, *args)

        for i in range(2):
            submit(f"concurrent{i}", "test_concurrent_multiruns_get_their_own_sweep_dirs",
                   ["-m", "experiment=smoke", *FAST], concurrent)
        for name, args, _ in ERROR_CASES:
            if name in SUBPROCESS_CASES:
                submit(name, f"test_user_error_is_one_line[{name}]",
                       case_args(name, args, workdir), workdir)
        submit("smoke", "test_smoke_run",
               ["experiment=smoke", f"hydra.run.dir={runs}/smoke"], workdir)
        submit("multirun", "test_multirun_writes_one_dir_per_job",
               ["-m", "experiment=smoke", "seed=0,1", *FAST, f"hydra.sweep.dir={workdir}/sweep"],
               workdir)
        submit("script", "test_installed_script_entry_point",
               ["experiment=smoke", *FAST, f"hydra.run.dir={runs}/script"], workdir, None,
               ENTRY_SCRIPT)
        submit("compose_api", "test_compose_api_in_a_fresh_interpreter", [], workdir, None,
               COMPOSE_SCRIPT)
        submit("full_error", "test_hydra_full_error_gives_the_traceback",
               ["optimizer.lr=-1", f"hydra.run.dir={runs}/full"], workdir,
               {"HYDRA_FULL_ERROR": "1"})
        yield futures


def case_args(name: str, args: list[str], workdir: Path) -> list[str]:
    args = [a.format(tmp=workdir) for a in args]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={workdir}/runs/{name}")
    return args


def run_main(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str, str]:
    """``swa-train ARGS`` in this process: (exit code, stdout, stderr). The environment, the
    entry point's module state and Hydra's logging setup are put back afterwards."""
    for key in ("HYDRA_FULL_ERROR", "SWA_RUN_ID", "SWA_DATA_ROOT"):
        monkeypatch.setenv(key, "")  # recorded, so that what main() sets is undone
        monkeypatch.delenv(key)
    monkeypatch.setattr(sys, "argv", ["swa-train", *args])
    monkeypatch.setattr(train_module, "_STATE", dict.fromkeys(train_module._STATE, False))
    monkeypatch.setitem(SWEEP, "dir", None)
    monkeypatch.chdir(cwd)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            train_module.main()
    finally:
        # Hydra configured the root logger for the job: a console handler and train.log.
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize(("name", "args", "words"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_user_error_is_one_line(name: str, args: list[str], words: list[str], workdir: Path,
                                jobs: dict[str, Future[Proc]], monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    if name == "no_gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    if name in SUBPROCESS_CASES:
        proc = jobs[name].result()
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = run_main(case_args(name, args, workdir), workdir, monkeypatch, capsys)
    assert "Traceback" not in err + out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for word in words:
        assert word.format(tmp=workdir) in lines[0]
    assert code == 2
    # Nothing was trained, and nothing earlier was lost; a run dir the job made records why.
    for path in workdir.glob(f"runs/{name}/metrics.json"):
        record = json.loads(path.read_text())
        assert record["status"] == "failed" and record["error"] in lines[0]
        assert not list(path.parent.glob("*.pt"))
    finished = json.loads((workdir / "finished" / "metrics.json").read_text())
    assert finished == {"status": "finished", "sgd": {"test_acc": 0.5}}


def test_hydra_full_error_gives_the_traceback(jobs: dict[str, Future[Proc]]) -> None:
    proc = jobs["full_error"].result()
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "UserError: optimizer.lr=-1.0: must be a positive number" in proc.stderr
    assert not any(ln.startswith("error:") for ln in proc.stderr.splitlines())


def test_smoke_run(workdir: Path, jobs: dict[str, Future[Proc]]) -> None:
    proc = jobs["smoke"].result()
    run_dir = workdir / "runs" / "smoke"
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished"
    assert metrics["train"]["epochs"] == 4
    assert metrics["swa"]["n_averaged"] > 0
    assert (run_dir / "history.csv").is_file()
    assert (run_dir / "swa.pt").is_file()
    # Hydra's record of the run, and its log with one line per epoch.
    assert "experiment=smoke" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch ") >= 4
    # hydra.job.chdir is false and the run dir was given: nothing lands in the cwd.
    assert not (workdir / "outputs").exists()


def test_installed_script_entry_point(workdir: Path, jobs: dict[str, Future[Proc]]) -> None:
    """`swa-train` calls swa_research.train:main from an imported module (not __main__), so
    Hydra looks for the configs as the package swa_research.conf."""
    proc = jobs["script"].result()
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((workdir / "runs" / "script" / "metrics.json").read_text())
    assert metrics["status"] == "finished"


def test_compose_api_in_a_fresh_interpreter(jobs: dict[str, Future[Proc]]) -> None:
    """From a notebook: conf/config.yaml's schema is registered by the conf package itself."""
    proc = jobs["compose_api"].result()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "synthetic"


def test_multirun_writes_one_dir_per_job(workdir: Path, jobs: dict[str, Future[Proc]]) -> None:
    proc = jobs["multirun"].result()
    sweep = workdir / "sweep"
    assert proc.returncode == 0, proc.stderr
    results = {}
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["status"] == "finished"
        results[job] = metrics
        assert f"seed={job}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    # Different seeds, different runs.
    assert results["0"]["sgd"] != results["1"]["sgd"]
    # The sweep's report, written after the last job: seeds are not a configuration.
    assert "| all runs | 2 |" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_concurrent_multiruns_get_their_own_sweep_dirs(workdir: Path,
                                                      jobs: dict[str, Future[Proc]]) -> None:
    for i in range(2):
        proc = jobs[f"concurrent{i}"].result()
        assert proc.returncode == 0, proc.stderr
    sweeps = sorted((workdir / "concurrent" / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 2, sweeps
    for sweep in sweeps:
        metrics = json.loads((sweep / "0" / "metrics.json").read_text())
        assert metrics["status"] == "finished"
        # The sweep dir came from SWA_RUN_ID and the default hydra.sweep.dir: the report of
        # each multirun lands in its own.
        assert "| all runs | 1 |" in (sweep / "report.md").read_text()


def test_a_sweep_stops_at_its_first_jobs_data_error(tmp_path: Path) -> None:
    """Every job would fail alike: one line, exit 2, the first job's record, no report of
    dashes and no other job started."""
    sweep = tmp_path / "sweep"
    r = cli(["-m", "data=cifar10", f"data.root={tmp_path}/nocifar", "data.download=false",
             "seed=0,1,2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: CIFAR-10 not found"), r.stderr
    assert errors[0].endswith("the sweep stops at its first job with this error")
    assert "Traceback" not in r.stderr + r.stdout
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]
    assert json.loads((sweep / "0" / "metrics.json").read_text())["status"] == "failed"
    assert not (sweep / "report.md").exists() and not list(sweep.glob("*.png"))


def test_a_swa_choice_an_experiment_would_drop_is_refused(tmp_path: Path) -> None:
    """experiment=lm/char_cpu sets swa.also=[ema], which replaces swa=swag's [swag]: one line
    saying so, instead of a run without SWAG."""
    text = tmp_path / "t.txt"
    text.write_text("abc def ghi\n" * 500)
    r = cli(["experiment=lm/char_cpu", "swa=swag", f"data.root={text}",
             "optimizer=adamw_schedulefree"], tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "error: swa=swag keeps swag beside the primary average, but swa.also=['ema'] (set by "
        "the experiment or an override) replaced the group's list, so no swag would be kept; "
        "add it: swa.also=[ema,swag]")
