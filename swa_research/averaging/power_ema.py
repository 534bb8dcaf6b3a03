"""Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2, Section 3 and Appendix C; NVlabs/edm2 ``training/phema.py``).

An EMA whose averaging profile grows with training time: at the t-th point (t counted from 1)
the average is mixed as avg <- beta_t * avg + (1 - beta_t) * w with beta_t = (1 - 1/t)^(gamma+1),
so that the average of t points weighs the point at time tau as tau^gamma (a power function
profile). Its width relative to the training time, sigma_rel, is a function of gamma alone
(EDM2's Eq. 3): sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), inverted by the
largest real root of the cubic gamma^3 + 7 gamma^2 + (16 - t) gamma + (12 - t) = 0 with
t = sigma_rel^-2 (EDM2's ``std_to_exp``). EDM2's defaults: sigma_rel 0.05 (gamma 16.97) and 0.10
(gamma 6.94).

``swa.sigma_rel`` chooses it (``swa=power_ema``); the points are the run's plan, every
``swa.freq`` units from ``swa.start``, and t counts them: with ``swa.start=0`` and
``swa.freq=1`` (a point after every step) the average is EDM2's ``power_function_beta`` step by
step; with a later start the profile's time starts at the first point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from torch import Tensor, nn

from swa_research.averaging.base import WeightAverage
from swa_research.averaging.ema import decayed_multi_avg_fn

# sigma_rel as gamma -> 0 (the equal average's width): sqrt(1 / 12). Wider ones have gamma < 0.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2's ``std_to_exp``: the exponent gamma of a power EMA of relative width
    ``sigma_rel`` (the largest real root of gamma^3 + 7 gamma^2 + (16 - t) gamma + (12 - t)
    with t = sigma_rel^-2)."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel={sigma_rel}: must be in (0, {MAX_SIGMA_REL:.4f})")
    t = sigma_rel ** -2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2's Eq. 3: the relative width of a power EMA of exponent ``gamma`` (> -1)."""
    if not gamma > -1.0:
        raise ValueError(f"gamma={gamma}: must be > -1")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def power_beta(gamma: float, t: int) -> float:
    """The decay that mixes the t-th point (t >= 1) into a power EMA: (1 - 1/t)^(gamma + 1)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_multi_avg_fn(gamma: float) -> Callable[[list[Tensor], list[Tensor], Any], None]:
    """The multi-tensor update mixing the (n+1)-th point into an average of n points."""
    return decayed_multi_avg_fn(lambda n: power_beta(gamma, n + 1))


class PowerEMA(WeightAverage):
    """EDM2's power-function EMA of relative width ``swa.sigma_rel``."""

    method = "power_ema"

    @staticmethod
    def check(*, sigma_rel: float = 0.10, **_: Any) -> None:
        """The options' one-line ValueError, in the arguments' names."""
        if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) \
                or not 0.0 < sigma_rel < MAX_SIGMA_REL:
            raise ValueError(f"sigma_rel={sigma_rel}: must be in (0, {MAX_SIGMA_REL:.4f}) "
                             "(EDM2's defaults: 0.05 and 0.10)")

    def __init__(self, model: nn.Module, *, sigma_rel: float = 0.10,
                 bn_update: bool = True) -> None:
        self.check(sigma_rel=sigma_rel)
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        super().__init__(model, power_multi_avg_fn(self.gamma), bn_update=bn_update)

    def settings(self) -> dict[str, Any]:
        return {"sigma_rel": self.sigma_rel, "gamma": round(self.gamma, 6)}

    def state_settings(self) -> dict[str, Any]:
        return {"sigma_rel": self.sigma_rel}


# -- post-hoc reconstruction (EDM2's Section 3.2 and Appendix C.3) ------------------------------

def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray
                ) -> np.ndarray:
    """The inner product of two power-function EMA profiles (EDM2's ``p_dot_p``): the profile
    at time t of exponent gamma weighs tau in [0, t] as (gamma + 1) tau^gamma / t^(gamma + 1)."""
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    num = (gamma_a + 1) * (gamma_b + 1) * ratio ** exponent
    return num / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def posthoc_ema_coefficients(times: Sequence[float], sigma_rels: Sequence[float],
                             at: float, sigma_rel: float) -> np.ndarray:
    """The weights that make the power EMA of width ``sigma_rel`` at time ``at`` out of saved
    power EMAs (the i-th of width ``sigma_rels[i]``, saved at time ``times[i]`` > 0): the least
    squares fit of its profile by theirs (EDM2's ``solve_posthoc_coefficients``, float64).
    Times count the EMA's points (a point after every step: the steps)."""
    if len(times) != len(sigma_rels) or not len(times):
        raise ValueError("times and sigma_rels: one of each per saved average, at least one")
    t_in = np.asarray(times, dtype=np.float64).reshape(-1, 1)
    if not (t_in > 0).all() or not at > 0:
        raise ValueError("times and at: must be > 0 (the profiles start at time 0)")
    g_in = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels], np.float64).reshape(-1, 1)
    g_out = np.float64(sigma_rel_to_gamma(sigma_rel))
    a = profile_dot(t_in, g_in, t_in.T, g_in.T)
    b = profile_dot(t_in, g_in, np.float64(at), g_out)
    return np.linalg.lstsq(a, b, rcond=None)[0].reshape(-1)


def combine_states(states: Iterable[dict[str, Tensor]], weights: Sequence[float]
                   ) -> dict[str, Tensor]:
    """sum_i weights[i] * states[i], tensor by tensor, in float64 then back to each tensor's
    dtype; a tensor that is not floating point (a BN counter) is the last state's."""
    total: dict[str, Tensor] = {}
    last: dict[str, Tensor] = {}
    for state, w in zip(states, weights, strict=True):
        for k, v in state.items():
            if v.is_floating_point():
                total[k] = total[k] + float(w) * v.double() if k in total else \
                    float(w) * v.double()
            last[k] = v
    if not last:
        raise ValueError("no states to combine")
    return {k: total[k].to(v.dtype) if k in total else v.clone() for k, v in last.items()}
