"""Entry point: ``python -m swa_research.train [overrides]`` (``-m`` for a multirun sweep).

It stays thin: config -> objects -> Trainer. :func:`train` does the same without Hydra, from a
notebook or a test, given a composed config and a run dir.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from swa_research.averaging import Averager, AveragingPlan
from swa_research.config import (
    Config,
    UserError,
    iterations_per_epoch,
    register_configs,
    to_config,
    validate,
    validate_budget,
)
from swa_research.data import Preprocess, build_data
from swa_research.loggers import LocalFiles, Loggers
from swa_research.models import build_model
from swa_research.optim import build_optimizer, build_schedule, build_scheduler
from swa_research.step import memory_format, resolve_precision
from swa_research.trainer import Trainer

log = logging.getLogger(__name__)

register_configs()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"trainer.device={name}: no CUDA GPU is available here; "
                            "use trainer.device=cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"trainer.device={name}: only {torch.cuda.device_count()} "
                            "GPU(s) visible")
        return dev
    return torch.device(name)


def check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output dir {run_dir} is not writable ({e.strerror or e}); "
                        "choose another with hydra.run.dir=... or hydra.sweep.dir=...") from e


def load_config(cfg: DictConfig | Config | dict[str, Any]) -> Config:
    """Typed, validated config; a wrong type, unknown key or missing value is a UserError."""
    try:
        config = to_config(cfg)
    except OmegaConfBaseException as e:
        raise UserError(one_line(e)) from e
    validate(config)
    return config


def train(cfg: DictConfig | Config | dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate one configuration; writes the run's files into ``run_dir`` and
    returns the contents of its metrics.json."""
    config = load_config(cfg)
    run_dir = Path(run_dir)
    check_writable(run_dir)
    device = resolve_device(config.trainer.device)
    resolve_precision(config.trainer.precision, device)  # fail before loading any data
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed)

    data = build_data(config.data, config.seed, device, config.trainer.num_workers)
    tc = config.trainer
    ipe = iterations_per_epoch(len(data.train), tc.batch_size, tc.drop_last)
    validate_budget(config, ipe)

    fmt = memory_format(tc.channels_last)
    model = build_model(config.model, data.num_classes, data.image_size).to(
        device, memory_format=fmt)
    optimizer = build_optimizer(config.optimizer, model.parameters())
    plan = AveragingPlan.from_config(config.swa, config.schedule, tc.epochs, ipe)
    schedule = build_schedule(config.schedule, config.optimizer.lr, config.swa.lr, ipe,
                              tc.epochs * ipe, plan.start_iter)
    scheduler = build_scheduler(optimizer, schedule)
    averager = None
    if plan.enabled:
        averager = Averager(model, config.swa.method, config.swa.decay, config.swa.bn_update)
    if tc.compile:
        # In place, after the average's deepcopy: the average stays an eager module (its BN
        # update and evaluation never recompile) and state dicts keep their keys.
        model.compile()

    dc = config.data
    train_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, augment=dc.augment,
                           memory_format=fmt)
    eval_pre = Preprocess(dc.normalize, dc.mean, dc.std, device, memory_format=fmt)
    loggers = Loggers([LocalFiles(run_dir)])
    trainer = Trainer(
        model=model, optimizer=optimizer, scheduler=scheduler, plan=plan, averager=averager,
        data=data, train_pre=train_pre, eval_pre=eval_pre, cfg=tc, seed=config.seed,
        run_dir=run_dir, loggers=loggers, config_dict=OmegaConf.to_container(
            OmegaConf.structured(config), resolve=True),  # type: ignore[arg-type]
        log_every=config.logger.log_every)
    return trainer.fit()


# ---------------------------------------------------------------------------------------------
# Hydra


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    _STATE["job_started"] = True
    hc = HydraConfig.get()
    try:
        metrics = train(cfg, hc.runtime.output_dir)
    except UserError as e:
        _STATE["user_error"] = True
        if hc.mode == RunMode.RUN and not _STATE["full_error"]:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        log.error("error: %s", e)
        raise
    # The value a sweeper (e.g. Optuna) optimises: the averaged model's validation accuracy,
    # or the SGD model's when there is no average.
    swa_acc = metrics["swa"]["val_acc"]
    return swa_acc if swa_acc is not None else metrics["sgd"]["val_acc"]


_STATE: dict[str, bool] = {"job_started": False, "user_error": False, "full_error": False}


def one_line(e: BaseException) -> str:
    """An exception and its causes as one line, without Hydra's boilerplate."""
    parts: list[str] = []
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen)
        if isinstance(seen, MissingMandatoryValue) and getattr(seen, "full_key", None):
            text = (f"{seen.full_key} has no value: set it on the command line "
                    f"({seen.full_key}=...)")
        elif isinstance(seen, OmegaConfBaseException):
            # OmegaConf appends full_key/object_type lines; the first line names the problem.
            key = getattr(seen, "full_key", None)
            text = text.splitlines()[0] if text else type(seen).__name__
            if key and key not in text:
                text += f" (key: {key})"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if any(ln.startswith("Config search path") for ln in lines):
            lines = lines[:[ln.startswith("Config search path") for ln in lines].index(True)]
        lines = [ln for ln in lines if not ln.startswith("Set the environment variable")]
        chunk = " ".join(lines)
        if chunk and chunk not in parts:
            parts.append(chunk)
        seen = seen.__cause__
    return ": ".join(parts) or type(e).__name__


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for anything else."""
    from hydra.errors import HydraException

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        return one_line(e)
    if isinstance(e, OSError) and not _STATE["job_started"]:
        # Raised by Hydra while it creates the run/sweep dir or its log file.
        where = e.filename or "the output dir"
        return (f"cannot write {where}: {e.strerror or e}; choose another output dir with "
                "hydra.run.dir=... (hydra.sweep.dir=... for -m)")
    return None


def main() -> None:
    # One id per command, shared by every job it starts (see hydra.run.dir in config.yaml).
    os.environ.setdefault(
        "SWA_RUN_ID", time.strftime("%Y-%m-%d_%H-%M-%S") + "_" + secrets.token_hex(3))
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    _STATE["full_error"] = full_error  # the job's own errors then raise too
    # Hydra then raises instead of printing a trimmed traceback, and we print one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except Exception as e:
        msg = user_error_message(e)
        if full_error or msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    finally:
        if not full_error:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
