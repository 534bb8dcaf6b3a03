"""Typed schema for every config group, and the checks that need more than a type.

Each group has one dataclass that covers all of its options, so that merging any option file
(or a command-line override) into it fails on an unknown key or a wrong type, naming the key.
Cross-field checks (positive learning rates, a valid ``swa.start``, ...) run in :func:`validate`,
before any data is loaded or any model is built. The ``model`` group is the exception: its keys
are the chosen model's options, which the model registry (:mod:`swa_research.models`) checks;
averaging method names are checked by :mod:`swa_research.averaging`'s registry. This module
imports neither (they build on it) and no Hydra: the entry point registers the schema.
"""

from __future__ import annotations

import difflib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from swa_research.config.checks import (
    check_positive,
    check_posthoc_ema,
    validate_data_paths,
    validate_swa,
)
from swa_research.errors import UserError

__all__ = ["UserError"]  # re-exported: raised by every module that checks a user's input

log = logging.getLogger(__name__)

MAX_EPOCHS = 10**9

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DataConfig:
    name: str = "cifar10"  # cifar10 | cifar100 | imagefolder | synthetic
    root: str = MISSING  # each option sets it; imagefolder leaves it to the user
    download: bool = True
    val_fraction: float = 0.1
    # The seed of the validation split, fixed whatever the training seed: runs of a sweep
    # over seeds hold out the same images, so that anything that ranks or selects across them
    # (ensembles, soups, the best of a sweep) never scores a run on its own training images.
    # Runs written before this key drew the split with their training seed.
    split_seed: int = 0
    augment: str = "none"  # none | crop_flip
    normalize: bool = False
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # imagefolder: the square side every image is resized (shorter side) and centre-cropped to,
    # on every path (swa_research.data.transforms); null: the first training image's (square) side.
    image_size: int | None = None
    # synthetic only: a learnable, generated data set.
    num_classes: int = 10
    train_size: int = 1000
    test_size: int = 200
    # imagefolder: keep the decoded images on disk (data.root/.swa_cache, or the user's cache
    # dir where data.root is read-only) so that the next run skips decoding.
    cache: bool = True
    # Image folders (imagefolder, imagenet): auto | true | false. true: decoded once into memory
    # (on the training device); false: decoded per batch from disk in trainer.num_workers
    # worker processes (swa_research.data.streaming); auto: in memory when the decoded set is
    # estimated to fit within memory_fraction of host RAM (and of GPU memory on CUDA).
    in_memory: str = "auto"
    memory_fraction: float = 0.5
    # The held-out split's folder next to train/ (imagenet: val).
    test_split: str = "test"
    # Streaming: evaluation resizes the shorter side to resize_size (null: image_size), then
    # centre-crops image_size; augment=random_resized_crop samples crops of crop_scale of the
    # area; each worker keeps prefetch_factor batches in flight.
    resize_size: int | None = None
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    prefetch_factor: int = 2
    # A quick look at real data: N training images (after the validation split), seeded and
    # class-balanced; 0: all of them.
    subset: int = 0
    # text (task=lm, swa_research.data.text): a text file or a folder of files matching
    # pattern, tokenized once (char | byte | gpt2) into a token file beside it; the last
    # val_fraction and test_fraction of the tokens are held out; an epoch is windows_per_epoch
    # training windows (0: as many as the training tokens fill); evaluation reads at most
    # eval_tokens tokens of a split (0: all).
    tokenizer: str = "char"
    pattern: str = "*.txt"
    test_fraction: float = 0.0
    windows_per_epoch: int = 0
    eval_tokens: int = 0


@dataclass
class OptimizerConfig:
    name: str = "adam"  # sgd | adam | adamw | adamw_schedulefree
    lr: float = 1e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    # Parameter kinds without weight decay: some of bias, norm, embedding (language models:
    # all three); none by default, as the SWA paper's code decays every parameter.
    no_decay: list[str] = field(default_factory=list)
    # Clip the gradients' global L2 norm to this before each step (0: off; nanoGPT: 1.0).
    grad_clip: float = 0.0
    # adamw_schedulefree (Defazio et al. 2024, package schedulefree): the weight of step t in
    # its average is t^r lr_max^weight_lr_power (the package's names and defaults).
    weight_lr_power: float = 2.0
    r: float = 0.0


@dataclass
class ScheduleConfig:
    # constant | decay_then_constant | cyclical | warmup_cosine | warmup_constant | wsd | fge
    name: str = "constant"
    # decay_then_constant: "epoch" steps the lr once per epoch as the SWA paper's code does.
    step_unit: str = "epoch"  # epoch | iter
    decay_start: float = 0.5
    decay_end: float = 0.9
    final_ratio: float = 0.01  # lr ratio at the end when averaging is off
    # cyclical: iterations per cycle.
    cycle: int = 100
    # warmup_cosine | warmup_constant | wsd (language-model pretraining; swa_research.training
    # .optim): linear warm-up iterations; wsd: the cooldown's share of the budget and shape.
    warmup: int = 0
    cooldown: float = 0.2
    cooldown_shape: str = "linear"  # linear | 1-sqrt
    # fge (Garipov et al. 2018): from the averaging start, triangular cycles of fge_cycle epochs
    # (even) from fge_lr_high down to swa.lr at mid-cycle and back; before it decay_then_constant.
    fge_cycle: int = 4
    fge_lr_high: float = 0.05


@dataclass
class SwaConfig:
    method: str = "swa"  # a name in the averaging registry (swa, ema), or none
    # Further averages kept beside the primary one on the same plan: methods, each kept under
    # its method's name (swa.also=[ema]: ema_* columns next to the swa_* ones), or averages
    # named with a method and options of their own, e.g. several EMAs at once:
    # swa.also=[{name:ema_fast,method:ema,decay:0.99},{name:ema_slow,method:ema,decay:0.999}]
    # (an option not given is the swa.* key's).
    also: list[Any] = field(default_factory=list)
    lr: float = 5e-4
    start: float = 4000  # in `unit`; below 1.0 a fraction of the budget
    freq: int = 50
    unit: str = "iter"  # iter | epoch
    decay: float = 0.999  # ema only
    bn_update: bool = True
    # Batch size of the BN pass over the training data; null: trainer.batch_size (the paper's).
    bn_batch_size: int | None = None
    # swag and swag_diag (Maddox et al., 2019; wjmaddox/swa_gaussian): the last max_models
    # deviations form the low-rank part; an evaluation is the mean of the predicted
    # probabilities of `samples` networks drawn with variance scale `swag_scale` (SWAG) or
    # `swag_diag_scale` (SWAG-Diagonal): swa_gaussian's uncertainty experiments use 0.5 for the
    # full-rank covariance 1/2 (Sigma_diag + Sigma_lowrank) and 1.0 for the diagonal alone.
    max_models: int = 20
    swag_scale: float = 0.5
    swag_diag_scale: float = 1.0
    samples: int = 30
    swag_device: str = "auto"  # auto (the training device) | cpu | cuda | cuda:N
    # Sample at every swag_eval_every-th evaluation of the run; 0: at the final one only.
    swag_eval_every: int = 0
    # ema: warm the decay up as decay_t = min(decay, 1 - (1 + n) ** (-2/3)), n the points already
    # averaged (timm's ModelEmaV3 warmup); docs/posthoc.md.
    ema_warmup: bool = False
    # ema: the BN running statistics recomputed over training batches before each evaluation
    # (recompute, the SWA paper's bn_update), or averaged like the weights (average: timm's
    # ModelEmaV3, Lightning's WeightAveraging).
    ema_buffers: str = "recompute"
    # lawa: the mean of the latest lawa_k points of the plan (taken every swa.freq units).
    lawa_k: int = 5
    # power_ema: EDM2's power-function EMA of this relative width (0.05 and 0.10: EDM2's pair).
    sigma_rel: float = 0.10
    # trainer.strategy=fsdp: cpu keeps swa, ema and lawa averages in (pinned) host memory.
    offload: str = "none"


@dataclass
class FsdpConfig:
    # trainer.strategy=fsdp (swa_research.training.fsdp): fully_shard on each module of these
    # classes, then on the root ([]: the model's blocks; the GPT's Block).
    wrap: list[str] = field(default_factory=list)
    reshard_after_forward: bool = True
    # The final weight files: whole (sgd_final.pt, gathered one tensor at a time) or dcp
    # (sgd_final.dcp/, each rank writing its shards: for models too large for one file).
    final_format: str = "whole"


@dataclass
class TrainerConfig:
    epochs: int = 50
    # The budget in steps (nanoGPT's max_iters): > 0 ends the run after this many optimizer
    # steps, inside an epoch if need be, and trainer.epochs is not read; fractions of the budget
    # (swa.start=0.75, schedule.cooldown) are of these steps. 0: trainer.epochs decides.
    max_steps: int = 0
    batch_size: int = 128
    eval_batch_size: int = 1000
    drop_last: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: DDP when a launcher (torchrun, srun) started several processes, else one process.
    # Under DDP batch_size is the global batch, split evenly over the ranks.
    strategy: str = "auto"  # auto | single | ddp | fsdp (asked for; auto never picks it)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    eval_every: int = 1
    # Evaluate every N optimizer steps (nanoGPT's eval_interval), inside epochs, and after the
    # last; > 0 replaces eval_every. 0: by epochs.
    eval_every_steps: int = 0
    # Evaluate before the first step too (history row of epoch 0): the starting point, e.g. the
    # pretrained model that SWA fine-tunes (the SWA paper's ImageNet "SGD" column).
    eval_at_start: bool = False
    num_workers: int = 2
    best_by: str = "val_loss"  # val_<metric> of the task: val_loss | val_acc (classification)
    # Gradient accumulation: each step's batch (per rank) in this many micro-batches.
    grad_accum: int = 1
    progress: str = "auto"  # auto | bar | line | none
    save_checkpoints: bool = True  # sgd_final.pt, sgd_best_val.pt, swa.pt at the end
    checkpoint_every: int = 1  # epochs between training checkpoints (0: none, no resume)
    # Steps between training checkpoints, written inside epochs (a resume continues from the
    # step); > 0 replaces checkpoint_every. 0: by epochs.
    checkpoint_every_steps: int = 0
    resume: str = "auto"  # auto | never | PATH of a checkpoint
    resume_override: bool = False  # resume even when the config differs from the checkpoint's
    deterministic: bool = False  # deterministic algorithms: bit-exact resume on CPU
    # auto: bf16 on CUDA (fp16 where the GPU has no bf16), fp32 on CPU.
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # Evaluation, the BN update of the average and calibration: fp32 by default, so that small
    # SWA gains are not measured through bf16 rounding; auto follows trainer.precision's rule.
    eval_precision: str = "fp32"  # auto | fp32 | bf16 | fp16
    # Keep checkpoint.pt once the run has finished (checkpoint.prev.pt is always removed then).
    keep_checkpoint: bool = False
    channels_last: bool = True
    compile: bool = False
    # torch.compile's mode: default, reduce-overhead (the compiled forward and backward replay as
    # CUDA graphs: a few launches per step instead of hundreds), max-autotune (autotuned kernels
    # and CUDA graphs), max-autotune-no-cudagraphs.
    compile_mode: str = "default"
    peak_tflops: float = 0.0  # MFU's peak; 0: the known GPU's datasheet (training.speed)
    # Start from these weights (a run's sgd_final.pt or swa.pt, or a state dict file) instead of
    # the seed's initialization: fine-tuning, FGE from a trained point, soups of one start.
    init_weights: str | None = None
    # Shortened runs (the debug group): train on limit_train_batches batches' worth of images
    # (a seeded selection), evaluate limit_eval_batches eval batches of each set; overfit on
    # overfit_batches fixed batches (validated on the same images). 0: off.
    limit_train_batches: int = 0
    limit_eval_batches: int = 0
    overfit_batches: int = 0
    # Weight snapshots of the training model for post-hoc averaging (python -m
    # swa_research.analysis.posthoc): every snapshot_every snapshot_units (0: none) into
    # trajectory/.
    snapshot_every: int = 0
    snapshot_unit: str = "epoch"  # iter (optimizer steps) | epoch
    snapshot_dtype: str = "fp32"  # fp32 | bf16 (integer buffers stay integer)
    # EDM2's post-hoc EMA (swa_research.training.posthoc_ema): power EMAs of these relative
    # widths (EDM2's pair: [0.05, 0.10]) updated after every step and saved every
    # posthoc_ema_every steps (and after the last) in snapshot_dtype; [] : off.
    posthoc_ema: list[float] = field(default_factory=list)
    posthoc_ema_every: int = 0


@dataclass
class LoggerConfig:
    backend: str = "none"  # none | wandb
    log_every: int = 50  # iterations between per-step logs (train loss, lr)
    project: str = "swa_research"
    entity: str | None = None
    group: str | None = None  # null: one group per multirun sweep
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # null: built from the job's overrides
    mode: str = "auto"  # auto | online | offline | disabled
    # Seconds a tracker may try to reach its server at the start (W&B: then offline; MLflow: a
    # warning, and the run goes on without it).
    init_timeout: float = 20.0
    # A multirun ends with a W&B report of the sweep (swa_research.analysis.dashboard;
    # logger=wandb).
    dashboard: bool = False
    # Further trackers beside (or instead of) W&B (swa_research.tracking.trackers):
    # logger=tensorboard, logger=csv, logger=mlflow, or several: logger=[wandb,tensorboard].
    tensorboard: bool = False
    csv: bool = False
    mlflow: bool = False
    mlflow_uri: str | None = None  # null: MLFLOW_TRACKING_URI, else MLflow's ./mlruns


@dataclass
class TaskConfig:
    # What the loop learns (swa_research.tasks): its data's batches, loss and metrics.
    name: str = "classification"


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # A model's name and its options: the keyword arguments of its builder in the model
    # registry (VGG: batch_norm, dropout, width), checked and completed there.
    model: dict[str, Any] = field(default_factory=lambda: {"name": "simplified"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    swa: SwaConfig = field(default_factory=SwaConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("cifar10", "cifar100", "imagefolder", "imagenet", "synthetic", "text"),
    "data.augment": ("none", "crop_flip", "random_resized_crop"),
    "trainer.strategy": ("auto", "single", "ddp", "fsdp"),
    "trainer.fsdp.final_format": ("whole", "dcp"),
    "swa.offload": ("none", "cpu"),
    "swa.ema_buffers": ("recompute", "average"),
    "optimizer.name": ("sgd", "adam", "adamw", "adamw_schedulefree"),
    "schedule.name": ("constant", "decay_then_constant", "cyclical", "warmup_cosine",
                      "warmup_constant", "wsd", "fge"),
    "schedule.cooldown_shape": ("linear", "1-sqrt"),
    "schedule.step_unit": ("epoch", "iter"),
    "swa.unit": ("iter", "epoch"),
    "trainer.progress": ("auto", "bar", "line", "none"),
    "logger.backend": ("none", "wandb"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.eval_precision": ("auto", "fp32", "bf16", "fp16"),
    "trainer.compile_mode": ("default", "reduce-overhead", "max-autotune",
                             "max-autotune-no-cudagraphs"),
    "trainer.snapshot_unit": ("iter", "epoch"),
    "trainer.snapshot_dtype": ("fp32", "bf16"),
}


def check_keys(cfg: DictConfig | dict[str, Any]) -> None:
    """Every key must be in the schema: ``+trainer.epoch=100`` (for ``epochs``) or a key from
    another project would otherwise be accepted, ignored and recorded as if it mattered."""
    given = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    known = flatten_dict(OmegaConf.to_container(OmegaConf.structured(Config)))  # type: ignore[arg-type]
    groups = {k.split(".")[0] for k in known}
    for key in flatten_dict(given):  # type: ignore[arg-type]
        if key in known or key == "hydra" or key.startswith(("hydra.", "model.")):
            continue  # model.*: the model registry checks a model's options
        near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
        if not near and key.split(".")[0] in groups:
            near = difflib.get_close_matches(key, [k for k in known
                                                   if k.split(".")[0] == key.split(".")[0]],
                                             n=1, cutoff=0.0)
        raise UserError(f"{key}: no such config key" + (f"; did you mean {near[0]}?"
                                                        if near else ""))


def to_config(cfg: DictConfig | Config | dict[str, Any]) -> Config:
    """Turn a composed DictConfig into the typed :class:`Config`, checking types and keys."""
    if isinstance(cfg, Config):
        return cfg
    check_keys(cfg)
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def iterations_per_epoch(num_train: int, batch_size: int, drop_last: bool) -> int:
    return num_train // batch_size if drop_last else -(-num_train // batch_size)


def validate(cfg: Config) -> None:
    """Checks that need more than a type; raises UserError naming the key."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise UserError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    if not cfg.trainer.best_by.startswith("val_"):
        raise UserError(f"trainer.best_by={cfg.trainer.best_by!r}: expected val_<metric>, e.g. "
                        "val_loss or val_acc (the task's metrics on the validation set)")
    check_positive(cfg.optimizer.lr, "optimizer.lr")
    if cfg.swa.method != "none":
        check_positive(cfg.swa.lr, "swa.lr")
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size",
                "trainer.eval_every", "swa.freq", "logger.log_every",
                "logger.init_timeout"):
        check_positive(_get(cfg, key), key)
    if cfg.trainer.epochs > MAX_EPOCHS:
        raise UserError(f"trainer.epochs={cfg.trainer.epochs}: at most {MAX_EPOCHS:,} (a "
                        "budget beyond any run; the iteration counters must stay exact)")
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"seed={cfg.seed}: must be an integer in [0, 2^63) (torch's generators "
                        "take 64-bit seeds)")
    for key in ("data.subset", "trainer.limit_train_batches", "trainer.limit_eval_batches",
                "trainer.overfit_batches"):
        if _get(cfg, key) < 0:
            raise UserError(f"{key}={_get(cfg, key)}: must be >= 0 (0: off)")
    for key in ("trainer.checkpoint_every", "trainer.max_steps", "trainer.eval_every_steps",
                "trainer.checkpoint_every_steps"):
        if _get(cfg, key) < 0:
            raise UserError(f"{key}={_get(cfg, key)}: must be >= 0 (0: off)")
    t = cfg.trainer
    if t.snapshot_every > t.epochs and t.snapshot_unit == "epoch" and not t.max_steps:
        raise UserError(f"trainer.snapshot_every={t.snapshot_every}: every "
                        f"{t.snapshot_every} epochs takes no snapshot in a budget of {t.epochs} "
                        "(trainer.snapshot_unit=iter counts iterations)")
    if cfg.trainer.snapshot_every < 0:
        raise UserError(f"trainer.snapshot_every={cfg.trainer.snapshot_every}: must be >= 0 "
                        "(0: no snapshots)")
    check_posthoc_ema(t)
    if not (cfg.trainer.peak_tflops >= 0 and math.isfinite(cfg.trainer.peak_tflops)):
        raise UserError(f"trainer.peak_tflops={cfg.trainer.peak_tflops}: must be >= 0 (0: the "
                        "known GPU's datasheet peak)")
    if cfg.trainer.grad_accum < 1 or cfg.trainer.batch_size % cfg.trainer.grad_accum:
        raise UserError(f"trainer.grad_accum={cfg.trainer.grad_accum}: must be at least 1 and "
                        f"divide trainer.batch_size={cfg.trainer.batch_size}")
    if not (cfg.optimizer.grad_clip >= 0 and math.isfinite(cfg.optimizer.grad_clip)):
        raise UserError(f"optimizer.grad_clip={cfg.optimizer.grad_clip}: must be >= 0 (0: off)")
    if cfg.trainer.num_workers < 0:
        raise UserError(f"trainer.num_workers={cfg.trainer.num_workers}: must be >= 0")
    if cfg.data.name == "text":
        if not 0.0 <= cfg.data.test_fraction < 1.0 or \
                cfg.data.val_fraction + cfg.data.test_fraction >= 1.0:
            raise UserError(f"data.test_fraction={cfg.data.test_fraction}: must be in [0, 1), "
                            "with data.val_fraction below 1 together")
        for key in ("windows_per_epoch", "eval_tokens"):
            if getattr(cfg.data, key) < 0:
                raise UserError(f"data.{key}={getattr(cfg.data, key)}: must be >= 0 (0: all)")
    if not 0 <= cfg.data.split_seed < 2**63:
        raise UserError(f"data.split_seed={cfg.data.split_seed}: must be an integer in [0, 2^63)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction={cfg.data.val_fraction}: must be in [0, 1)")
    if not isinstance(cfg.model.get("name"), str):
        raise UserError("model.name: must name a model (model=vgg16 or model.name=vgg16)")
    o = cfg.optimizer
    if not (math.isfinite(o.momentum) and 0.0 <= o.momentum < 1.0):
        raise UserError(f"optimizer.momentum={o.momentum}: must be in [0, 1)")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise UserError(f"optimizer.weight_decay={o.weight_decay}: must be a number >= 0")
    if cfg.optimizer.nesterov and (cfg.optimizer.name != "sgd" or cfg.optimizer.momentum <= 0):
        raise UserError("optimizer.nesterov=true needs optimizer=sgd with optimizer.momentum > 0")
    if len(cfg.optimizer.betas) != 2 or not all(0 <= b < 1 for b in cfg.optimizer.betas):
        raise UserError(f"optimizer.betas={cfg.optimizer.betas}: expected two numbers in [0, 1)")
    if o.name == "adamw_schedulefree":
        if not o.betas[0] > 0:
            raise UserError(f"optimizer.betas={o.betas}: schedule-free AdamW interpolates with "
                            "betas[0], which must be > 0 (its default: 0.9)")
        for key in ("weight_lr_power", "r"):
            if not (getattr(o, key) >= 0 and math.isfinite(getattr(o, key))):
                raise UserError(f"optimizer.{key}={getattr(o, key)}: must be a number >= 0")
    if cfg.data.normalize and (len(cfg.data.mean) != 3 or len(cfg.data.std) != 3
                               or min(cfg.data.std) <= 0):
        raise UserError("data.mean and data.std need three values each, std > 0")
    start = cfg.swa.start
    if not (math.isfinite(start) and start >= 0) or (start >= 1.0 and start != int(start)):
        raise UserError(f"swa.start={start}: must be a fraction of the budget below 1.0 "
                        "(swa.start=0.75) or a whole number of swa.unit (swa.start=4000)")
    s = cfg.schedule
    if not 0.0 <= s.decay_start <= s.decay_end <= 1.0:
        raise UserError(
            f"schedule.decay_start={s.decay_start}, schedule.decay_end={s.decay_end}: "
            "need 0 <= decay_start <= decay_end <= 1")
    if not 0.0 <= s.final_ratio <= 1.0:
        raise UserError(f"schedule.final_ratio={s.final_ratio}: must be in [0, 1] (the final "
                        "lr as a fraction of optimizer.lr)")
    if s.name == "cyclical":
        check_positive(s.cycle, "schedule.cycle")
    if s.name == "fge":
        if s.fge_cycle < 2 or s.fge_cycle % 2:
            raise UserError(f"schedule.fge_cycle={s.fge_cycle}: an even number of epochs >= 2 "
                            "(models are collected at the middle of each cycle)")
        check_positive(s.fge_lr_high, "schedule.fge_lr_high")
        if cfg.swa.method == "none":
            raise UserError("schedule=fge cycles from the averaging start: it needs an average "
                            "(swa=fge)")
    if s.warmup < 0:
        raise UserError(f"schedule.warmup={s.warmup}: must be >= 0 (iterations)")
    if not 0.0 <= s.cooldown <= 1.0:
        raise UserError(f"schedule.cooldown={s.cooldown}: must be a fraction of the budget in "
                        "[0, 1]")
    if cfg.data.name == "synthetic":
        for key in ("data.num_classes", "data.train_size", "data.test_size"):
            check_positive(_get(cfg, key), key)
        if cfg.data.num_classes < 2:
            raise UserError("data.num_classes must be at least 2")
    if cfg.data.image_size is not None:
        check_positive(cfg.data.image_size, "data.image_size")
    validate_data_paths(cfg.data)
    if cfg.swa.bn_batch_size is not None:
        check_positive(cfg.swa.bn_batch_size, "swa.bn_batch_size")
    validate_swa(cfg.swa)
    dev = cfg.trainer.device
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise UserError(f"trainer.device={dev!r}: expected auto, cpu, cuda or cuda:N")


def bn_batch_size(cfg: Config) -> int:
    """The batch size of the average's BN pass: swa.bn_batch_size, else the training one."""
    return cfg.swa.bn_batch_size or cfg.trainer.batch_size


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"swa": {"lr": 1}} -> {"swa.lr": 1}: the command-line names."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out
