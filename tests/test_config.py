"""Composition of every config option, the defaults, the experiment presets, and validation."""

from __future__ import annotations

import logging

import pytest
from conftest import GROUPS, TINY, compose_config, group_options
from omegaconf import OmegaConf

from swa_research.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Config,
    UserError,
    to_config,
    validate,
)
from swa_research.training.averages import check_budget, plan_from_config
from swa_research.training.build import load_config

# The field of each group that must name the option file it came from.
NAME_FIELD = {"data": "name", "model": "name", "optimizer": "name", "schedule": "name",
              "swa": "method", "logger": "backend"}
ALL_OPTIONS = [(g, o) for g in GROUPS for o in group_options(g)]


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no yaml files"
    # The options the design names are all there.
    assert {"cifar10", "cifar100", "imagefolder", "synthetic"} <= set(group_options("data"))
    assert {"vgg11", "vgg13", "vgg16", "vgg19", "simplified"} <= set(group_options("model"))
    assert {"sgd", "adam", "adamw"} <= set(group_options("optimizer"))
    assert {"constant", "cyclical", "decay_then_constant"} <= set(group_options("schedule"))
    assert {"swa", "ema", "none"} <= set(group_options("swa"))


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str, tmp_path) -> None:
    overrides = [f"{group}={option}"]
    if (group, option) in (("data", "imagefolder"), ("data", "text"), ("experiment", "cpu_quick")):
        overrides.append(f"data.root={tmp_path}")
    cfg = compose_config(overrides)
    config = to_config(cfg)
    assert isinstance(config, Config)
    validate(config)
    if group in NAME_FIELD:
        node = getattr(config, group)
        field = NAME_FIELD[group]
        value = node[field] if isinstance(node, dict) else getattr(node, field)
        # swa=swag: the SWA mean is the primary average, SWAG a further one (swa.also); the
        # trackers beside W&B are switches of their own (logger.tensorboard, ...).
        assert value == option or (group == "swa" and option in config.swa.also) or (
            group == "logger" and getattr(config.logger, option) is True)
    # The typed config round-trips to a plain, fully resolved dict.
    plain = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
    assert "${" not in str(plain)


def test_imagefolder_needs_a_root() -> None:
    cfg = compose_config(["data=imagefolder"])
    with pytest.raises(UserError, match=r"data\.root"):
        load_config(cfg)


def test_defaults_are_the_seed_experiment() -> None:
    c = to_config(compose_config())
    assert c.data.name == "cifar10"
    assert c.data.val_fraction == 0.1
    assert c.data.augment == "none"
    assert c.data.normalize is False
    assert c.model["name"] == "simplified"
    assert c.model["dropout"] == 0.5
    assert c.model["batch_norm"] is False
    assert c.model["width"] == 1.0
    assert c.optimizer.name == "adam"
    assert c.optimizer.lr == pytest.approx(1e-4)
    assert c.swa.method == "swa"
    assert c.swa.start == 4000
    assert c.swa.freq == 50
    assert c.swa.lr == pytest.approx(5e-4)
    assert c.swa.unit == "iter"
    assert c.schedule.name == "constant"
    assert c.trainer.epochs == 50
    assert c.trainer.batch_size == 128
    assert c.trainer.drop_last is True
    assert c.trainer.best_by == "val_loss"
    assert c.seed == 0
    # The seed_notebook preset spells out the same experiment.
    assert to_config(compose_config(["experiment=seed_notebook"])) == c


def test_paper_vgg16_preset() -> None:
    c = to_config(compose_config(["experiment=paper_vgg16"]))
    assert c.data.name == "cifar10"
    assert c.data.val_fraction == 0.0
    assert c.data.augment == "crop_flip"
    assert c.data.normalize is True
    assert c.data.mean == pytest.approx([0.485, 0.456, 0.406])
    assert c.data.std == pytest.approx([0.229, 0.224, 0.225])
    assert c.data.mean == pytest.approx(IMAGENET_MEAN)
    assert c.data.std == pytest.approx(IMAGENET_STD)
    assert c.model["name"] == "vgg16"
    assert c.model["batch_norm"] is False
    assert c.optimizer.name == "sgd"
    assert c.optimizer.lr == pytest.approx(0.05)
    assert c.optimizer.momentum == pytest.approx(0.9)
    assert c.optimizer.weight_decay == pytest.approx(5e-4)
    assert c.optimizer.nesterov is False
    assert c.schedule.name == "decay_then_constant"
    assert c.schedule.step_unit == "epoch"
    assert (c.schedule.decay_start, c.schedule.decay_end) == (0.5, 0.9)
    assert c.swa.method == "swa"
    assert c.swa.lr == pytest.approx(0.01)
    assert c.swa.start == 161
    assert c.swa.unit == "epoch"
    assert c.swa.freq == 1
    assert c.trainer.epochs == 300
    assert c.trainer.batch_size == 128
    assert c.trainer.drop_last is False


@pytest.mark.parametrize(("preset", "data"), [("paper_vgg16_sgd", "cifar10"),
                                              ("paper_vgg16_sgd_cifar100", "cifar100")])
def test_paper_sgd_baselines(preset: str, data: str) -> None:
    """The paper's SGD column: its recipe without averaging, 200 epochs, lr decayed over the
    whole budget to 1% (0.05 -> 0.0005)."""
    from swa_research.training.optim import build_schedule

    c = to_config(compose_config([f"experiment={preset}"]))
    assert c.data.name == data and c.swa.method == "none" and c.trainer.epochs == 200
    assert c.optimizer.lr == 0.05 and c.optimizer.momentum == 0.9
    plan = plan_from_config(c.swa, c.schedule, 200, 391)
    sched = build_schedule(c.schedule, c.optimizer.lr, c.swa.lr, 391, plan.total_iters,
                           plan.start_iter, plan.lr_switch_iter)
    assert sched(0) == 0.05 and sched(99 * 391) == 0.05  # t = 99/200 <= 0.5
    assert sched(199 * 391) == pytest.approx(0.0005)


def test_paper_variants() -> None:
    base = to_config(compose_config(["experiment=paper_vgg16"]))
    bn = to_config(compose_config(["experiment=paper_vgg16_bn"]))
    assert bn.model["batch_norm"] is True
    bn.model["batch_norm"] = False
    assert bn == base  # nothing else differs

    c100 = to_config(compose_config(["experiment=paper_vgg16_cifar100"]))
    assert c100.data.name == "cifar100"
    c100.data.name = "cifar10"
    assert c100 == base


def test_seed_notebook_as_run_has_no_dropout() -> None:
    c = to_config(compose_config(["experiment=seed_notebook_as_run"]))
    assert c.model["dropout"] == 0.0
    c.model["dropout"] = 0.5
    assert c == to_config(compose_config(["experiment=seed_notebook"]))


def test_smoke_preset_needs_no_download() -> None:
    c = load_config(compose_config(["experiment=smoke"]))
    assert c.data.name == "synthetic"
    assert c.swa.method == "swa"


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_command_line_groups_beat_experiment_overrides(experiment: str) -> None:
    """`experiment=X data=synthetic`: the command line's group choice wins over the preset's
    `override /data: ...`, and the preset's values are still applied on top."""
    root = ["data.root=/somewhere"] if experiment == "cpu_quick" else []  # imagefolder preset
    preset = to_config(compose_config([f"experiment={experiment}", *root]))
    for order in ([f"experiment={experiment}", *TINY], [*TINY, f"experiment={experiment}"]):
        c = load_config(compose_config(order))
        assert c.data.name == "synthetic"
        assert c.data.train_size == 128
        assert c.trainer.epochs == 2
        assert c.model["width"] == 0.0625
        assert c.model["name"] == preset.model["name"]
        assert c.optimizer == preset.optimizer
        assert c.schedule == preset.schedule
        assert c.data.val_fraction == preset.data.val_fraction
        assert c.data.augment == preset.data.augment


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optimizer.lr=0", "optimizer.lr"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("swa.lr=0", "swa.lr"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.batch_size=-4", "trainer.batch_size"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("swa.freq=0", "swa.freq"),
        ("model.width=0", "model.width"),
        ("data.augment=foo", "data.augment"),
        ("trainer.best_by=test_acc", "trainer.best_by"),
        ("trainer.snapshot_every=60", "every 60 epochs takes no snapshot in a budget of 50"),
        ("schedule.warmup=-1", "schedule.warmup"),
        ("schedule.cooldown=1.5", "schedule.cooldown"),
        ("schedule.cooldown_shape=cubic", "schedule.cooldown_shape"),
        ("trainer.grad_accum=3", "trainer.grad_accum=3: must be at least 1 and divide"),
        ("optimizer.grad_clip=-1", "optimizer.grad_clip"),
        ("swa.unit=step", "swa.unit"),
        ("schedule.step_unit=batch", "schedule.step_unit"),
        ("trainer.device=tpu", "trainer.device"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("model.dropout=1.0", "model.dropout"),
        ("swa.start=-1", "swa.start"),
        ("optimizer.nesterov=true", "nesterov"),
        ("trainer.num_workers=-1", "trainer.num_workers"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("swa.start=nan", "swa.start"),
        ("swa.start=inf", "swa.start"),
        ("swa.start=1.5", "swa.start"),
        ("optimizer.weight_decay=nan", "optimizer.weight_decay"),
        ("optimizer.weight_decay=inf", "optimizer.weight_decay"),
        ("optimizer.momentum=1.0", "optimizer.momentum"),
        ("optimizer.momentum=-0.1", "optimizer.momentum"),
        ("optimizer.momentum=nan", "optimizer.momentum"),
        ("optimizer.momentum=inf", "optimizer.momentum"),
    ],
)
def test_load_config_rejects_bad_values(override: str, key: str) -> None:
    cfg = compose_config([override])
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(cfg)


@pytest.mark.parametrize(("override", "message"), [
    ("+trainer.epoch=100", "trainer.epoch: no such config key; did you mean trainer.epochs?"),
    ("+swa.startt=3", "swa.startt: no such config key; did you mean swa.start?"),
    ("+unknown.key=1", "unknown.key: no such config key"),
])
def test_appended_keys_outside_the_schema_are_refused(override: str, message: str) -> None:
    """``+key=value`` forces a key into the composed config; the schema still refuses it."""
    with pytest.raises(UserError) as info:
        load_config(compose_config([override]))
    assert str(info.value) == message


def test_start_is_a_fraction_or_a_whole_count() -> None:
    for good in ("0", "0.75", "1", "1.0", "4000"):
        load_config(compose_config([f"swa.start={good}"]))


def test_nesterov_with_sgd_momentum_is_fine() -> None:
    load_config(compose_config(["optimizer=sgd", "optimizer.nesterov=true"]))


@pytest.mark.parametrize(
    ("node", "words"),
    [
        ({"trainer": {"epochs": "abc"}}, ["trainer.epochs", "abc"]),
        ({"trainer": {"batch_size": 1.5}}, ["trainer.batch_size"]),
        ({"data": {"root": "d"}, "model": {"batch_norm": "maybe"}},
         ["model.batch_norm='maybe': expected a bool"]),
        ({"data": {"root": "d"}, "model": {"name": "vgg16", "depth": 3}},
         ["model.depth: not an option of model vgg16"]),
        ({"foo": 1}, ["foo"]),
        ({"trainer": {"epoch": 3}}, ["epoch"]),
    ],
)
def test_load_config_rejects_wrong_types_and_unknown_keys(node: dict, words: list[str]) -> None:
    with pytest.raises(UserError) as info:
        load_config(node)
    for word in words:
        assert word in str(info.value)
    assert "\n" not in str(info.value)


def test_compose_itself_rejects_wrong_types() -> None:
    """The schema is part of the defaults list, so a bad override fails already at compose."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose_config(["trainer.epochs=abc"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["foo=1"])


def test_check_budget(caplog: pytest.LogCaptureFixture) -> None:
    c = load_config(compose_config(["swa.start=100000"]))
    with pytest.raises(UserError, match=r"swa\.start=100000 is beyond .* 17550 iterations"):
        check_budget(c, 351)  # 50 epochs of 351 iterations
    check_budget(load_config(compose_config(["swa.start=17549", "swa.freq=1"])), 351)
    # The last iteration is not averaged when start equals the budget (n > start).
    with pytest.raises(UserError):
        check_budget(load_config(compose_config(["swa.start=17550", "swa.freq=1"])), 351)

    paper = load_config(compose_config(["experiment=paper_vgg16", "swa.start=301"]))
    with pytest.raises(UserError, match=r"300 epochs"):
        check_budget(paper, 391)
    check_budget(load_config(compose_config(["experiment=paper_vgg16"])), 391)

    # One update only: allowed, with a warning that names swa.freq.
    with caplog.at_level(logging.WARNING, logger="swa_research.config"):
        check_budget(load_config(compose_config(
            ["swa.unit=epoch", "swa.start=2", "trainer.epochs=3"])), 351)
    assert "swa.freq=50 with swa.unit=epoch averages only once in this run (after epoch 2 of 3)" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="swa_research.config"):
        check_budget(load_config(compose_config(
            ["swa.unit=epoch", "swa.start=2", "swa.freq=1", "trainer.epochs=3"])), 351)
        check_budget(load_config(compose_config()), 351)
    assert caplog.text == ""

    # No averaging: any start is fine; a batch larger than the training set is not.
    check_budget(load_config(compose_config(["swa=none", "swa.start=100000"])), 351)
    with pytest.raises(UserError, match=r"trainer\.batch_size"):
        check_budget(load_config(compose_config()), 0)


def test_fractional_start_fits_any_budget() -> None:
    # Half of 4 iterations: iterations 3 and 4 are averaged.
    check_budget(load_config(compose_config(
        ["swa.start=0.5", "swa.freq=1", "trainer.epochs=1"])), 4)
    check_budget(load_config(compose_config(
        ["swa.start=0.5", "swa.unit=epoch", "swa.freq=1", "trainer.epochs=1"])), 4)


def test_cfg_job_and_wandb_show_the_keys_that_act_first() -> None:
    """--cfg job prints the run's config with another data set's, schedule's, optimizer's and
    method's options grouped apart (commented out); W&B records only the keys that act."""
    import yaml

    from swa_research.config.keys import unused_keys
    from swa_research.tracking.loggers import applicable_config
    from swa_research.train import cfg_job_overrides, job_config_text
    from swa_research.training.build import config_dict_of

    assert cfg_job_overrides(["--cfg", "job", "swa=swag"]) == ["swa=swag"]
    assert cfg_job_overrides(["--cfg", "job", "-m", "seed=0,1"]) is None
    assert cfg_job_overrides(["--cfg", "hydra"]) is None
    text = job_config_text(["swa=swag"])
    active, _, rest = text.partition("# Not used by this run")
    cfg = yaml.safe_load(active)
    assert cfg["swa"]["swag_scale"] == 0.5 and "swag_diag_scale" not in cfg["swa"]
    assert "in_memory" not in cfg["data"] and "cycle" not in cfg["schedule"]
    assert "#   swa.swag_diag_scale: 1.0" in rest and "#   data.in_memory: auto" in rest
    config = config_dict_of(load_config(compose_config(["data=imagefolder", "data.root=/x",
                                                        "schedule=cyclical", "optimizer=sgd",
                                                        "swa.also=[ema]"])))
    unused = unused_keys(config)
    assert "data.in_memory" not in unused and "schedule.cycle" not in unused
    assert "swa.decay" not in unused and "optimizer.momentum" not in unused
    assert {"data.train_size", "optimizer.betas", "schedule.decay_start",
            "swa.swag_scale"} <= set(unused)
    flat = applicable_config(config)
    assert "data.in_memory" in flat and "optimizer.betas" not in flat
    none = unused_keys(config_dict_of(load_config(compose_config(["swa=none"]))))
    assert "swa.lr" in none and "swa.method" not in none
