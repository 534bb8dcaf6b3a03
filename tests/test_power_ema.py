"""EDM2's power-function EMA (swa=power_ema): the sigma_rel <-> gamma conversion against
EDM2's numbers, and the average against the power profile's closed form, computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_config
from torch import nn

from swa_research.averaging import make_average
from swa_research.averaging.power_ema import (
    MAX_SIGMA_REL,
    gamma_to_sigma_rel,
    sigma_rel_to_gamma,
)
from swa_research.training.build import train


def test_sigma_rel_and_gamma_convert_both_ways_as_edm2() -> None:
    """EDM2 (Karras et al. 2024, Section 3): sigma_rel 0.05 is gamma 16.97 and 0.10 is 6.94;
    each gamma is the cubic's root and converts back."""
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in (0.01, 0.03, 0.05, 0.1, 0.2, 0.28):
        g = sigma_rel_to_gamma(s)
        t = s ** -2
        assert g ** 3 + 7 * g ** 2 + (16 - t) * g + (12 - t) == pytest.approx(0, abs=1e-6 * t)
        assert gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-10)
    assert gamma_to_sigma_rel(0.0) == pytest.approx(MAX_SIGMA_REL)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match=f"sigma_rel={bad}: must be in"):
            sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_the_average_has_the_power_profile(sigma_rel: float) -> None:
    """After T points the average weighs point i by (i^(g+1) - (i-1)^(g+1)) / T^(g+1), the
    power function profile of EDM2's Eq. 2 in discrete time, computed here in float64 from the
    points themselves (not through the update rule)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    avg = make_average("power_ema", model, sigma_rel=sigma_rel)
    g = sigma_rel_to_gamma(sigma_rel)
    points = []
    for _ in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        points.append(torch.cat([p.detach().double().flatten() for p in model.parameters()]))
        avg.update(model)
        t = len(points)
        weights = [(i ** (g + 1) - (i - 1) ** (g + 1)) / t ** (g + 1) for i in range(1, t + 1)]
        assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
        want = sum(w * x for w, x in zip(weights, points, strict=True))
        got = torch.cat([p.detach().double().flatten() for p in avg.module.parameters()])
        assert (got - want).abs().max().item() < 1e-5, t
    assert avg.n_averaged == 40
    assert avg.settings()["sigma_rel"] == sigma_rel
    assert avg.settings()["gamma"] == pytest.approx(g, abs=1e-6)


def test_a_run_with_power_ema_and_a_second_width_beside_it(tmp_path: Path) -> None:
    """swa=power_ema from config with a second sigma_rel as a named average: both recorded with
    their widths; a bad width is refused in one line."""
    from swa_research.config import UserError
    from swa_research.training.build import load_config

    run = tmp_path / "run"
    train(compose_config([*TINY, "swa=power_ema", "swa.start=0", "swa.freq=1",
                          "swa.also=[{name:phema_05,method:power_ema,sigma_rel:0.05}]"]), run)
    m = json.loads((run / "metrics.json").read_text())
    assert m["swa"]["sigma_rel"] == 0.1 and m["phema_05"]["sigma_rel"] == 0.05
    assert m["swa"]["n_averaged"] == m["train"]["iterations"] > 1
    assert m["swa"]["test_loss"] != m["phema_05"]["test_loss"]
    with pytest.raises(UserError, match=r"^swa.sigma_rel=0.5: must be in \(0, 0.2887\)"):
        cfg = load_config(compose_config([*TINY, "swa=power_ema", "swa.sigma_rel=0.5"]))
        from swa_research.training.averages import build_averages

        build_averages(nn.Linear(2, 2), cfg.swa)
