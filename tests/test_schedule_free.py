"""Schedule-free AdamW (optimizer=adamw_schedulefree): the run's SGD model is the optimizer's
averaged iterate x, and looking at it never changes the training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from test_lm import lm_run, write_text
from torch import nn

from swa_research.config import OptimizerConfig, UserError, to_config, validate
from swa_research.models import build_model, resolve_model_config
from swa_research.training.build import train
from swa_research.training.optim import averaged_iterate, build_optimizer, is_schedule_free

schedulefree = pytest.importorskip("schedulefree")


def stepped(model: nn.Module, steps: int = 5) -> torch.optim.Optimizer:
    opt = build_optimizer(OptimizerConfig(name="adamw_schedulefree", lr=1e-2,
                                          weight_decay=0.1), model)
    opt.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 3, 4, 4, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 2))


def test_inside_the_block_the_model_is_x_and_after_it_y_bit_for_bit() -> None:
    model = net()
    opt = stepped(model)
    assert is_schedule_free(opt) and isinstance(opt, schedulefree.AdamWScheduleFree)
    beta1 = opt.param_groups[0]["betas"][0]
    y = [p.detach().clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    x = [yi + (1 - 1 / beta1) * (opt.state[p]["z"] - yi) for yi, p in zip(y, model.parameters(),
                                                                            strict=True)]
    batches = [(torch.randn(8, 3, 4, 4) + 3.0, None) for _ in range(2)]

    with averaged_iterate(opt, model, lambda: batches):  # the trainer's BN pass batches
        for p, xi in zip(model.parameters(), x, strict=True):
            torch.testing.assert_close(p, xi, rtol=1e-6, atol=1e-7)
        assert not opt.param_groups[0]["train_mode"]
        # BN statistics gathered at x over the batches given.
        with torch.no_grad():
            out = torch.cat([model[0](b) for b, _ in batches])
        torch.testing.assert_close(model[1].running_mean, out.mean((0, 2, 3)))
    assert opt.param_groups[0]["train_mode"]
    for p, yi in zip(model.parameters(), y, strict=True):
        assert torch.equal(p, yi)  # restored, not lerped back
    for b, old in zip(model.buffers(), stats, strict=True):
        assert torch.equal(b, old)
    # Another optimizer: nothing happens.
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with averaged_iterate(sgd, model):
        assert all(torch.equal(p, yi) for p, yi in zip(model.parameters(), y, strict=True))


def sf_run(text: Path, *extra: str) -> list[str]:
    return [*lm_run(text), "optimizer=adamw_schedulefree", "optimizer.lr=1e-2",
            "schedule=warmup_constant", "schedule.warmup=5", "swa.also=[]",
            "trainer.keep_checkpoint=true", *extra]


def test_a_schedule_free_run_learns_reports_x_and_evaluating_does_not_change_it(
        tmp_path: Path) -> None:
    text = write_text(tmp_path / "corpus.txt")
    m = train(compose_config(sf_run(text, "trainer.eval_every=1")), tmp_path / "a")
    assert m["status"] == "finished"
    chance = math.log(len(set(text.read_text())))
    assert m["sgd"]["val_loss"] < 0.6 * chance and m["swa"]["val_loss"] < 0.6 * chance
    # The saved SGD model is x: the final checkpoint's y and z, put in eval mode.
    ckpt = torch.load(next((tmp_path / "a").glob("checkpoint*.pt")), weights_only=False)
    final = torch.load(tmp_path / "a" / "sgd_final.pt", weights_only=False)["state_dict"]
    assert ckpt["optimizer"]["param_groups"][0]["train_mode"]  # saved as training left it
    cfg = compose_config(sf_run(text))
    model = build_model(resolve_model_config(OmegaConf.to_container(cfg.model)),
                        final["wte.weight"].shape[0])
    opt = build_optimizer(OptimizerConfig(**OmegaConf.to_container(cfg.optimizer)), model)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    assert not torch.equal(model.state_dict()["wte.weight"], final["wte.weight"])  # y is not x
    opt.eval()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=1e-6)
    # ... and evaluating every epoch instead of once leaves the training run bit-identical.
    m2 = train(compose_config(sf_run(text, "trainer.eval_every=4")), tmp_path / "b")
    final2 = torch.load(tmp_path / "b" / "sgd_final.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(final[k], final2[k]) for k in final)
    assert m2["sgd"]["val_loss"] == m["sgd"]["val_loss"]


@pytest.mark.parametrize(("extra", "error"), [
    (["optimizer.betas=[0.0,0.999]"], r"optimizer.betas=\[0.0, 0.999\]: schedule-free"),
    (["optimizer.r=-1"], r"optimizer.r=-1.0: must be a number >= 0"),
])
def test_bad_schedule_free_settings_are_one_line(extra: list[str], error: str) -> None:
    with pytest.raises(UserError, match=error):
        validate(to_config(compose_config(["optimizer=adamw_schedulefree", *extra])))
