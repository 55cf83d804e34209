"""DDIM on a noise schedule: sampling with η, and inversion, for any prior that predicts ε; and
LCM's multistep sampler for latent-consistency models.

Written against ``alphas_cumprod`` alone (not a diffusers scheduler) so that every prior — Stable
Diffusion, the exact prior, one written outside the project — shares one definition of the
forward process ``x_t = a_t·x_0 + s_t·ε`` with ``a_t = sqrt(ᾱ_t)``, ``s_t = sqrt(1 − ᾱ_t)``.
A timestep of -1 stands for clean data (ᾱ = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .events import Cancelled

#: ε-prediction at (x_t, t); the caller folds in prompts, guidance and per-view conditioning.
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # (T,) float64 on the CPU

    @classmethod
    def stable_diffusion(cls, steps: int = 1000) -> "NoiseSchedule":
        """The 'scaled_linear' betas of Stable Diffusion 1.x/2.x (0.00085 → 0.012)."""
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1 - betas, 0))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def coefficients(self, t: int) -> tuple[float, float]:
        """(a_t, s_t) of the forward process."""
        ab = self.alpha_bar(t)
        return ab ** 0.5, (1 - ab) ** 0.5

    def grid(self, steps: int) -> list[int]:
        """``steps`` timesteps evenly covering [0, T), ascending, the last one T - 1."""
        T = self.num_train_timesteps
        return [round((i + 1) * T / steps) - 1 for i in range(steps)]

    def snap(self, t: float, steps: int) -> int:
        """The grid timestep nearest to t."""
        return min(self.grid(steps), key=lambda g: abs(g - t))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        a, s = self.coefficients(t)
        return a * x0 + s * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        a, s = self.coefficients(t)
        return (x_t - s * eps) / a


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
              eta: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM update from t to t_prev < t (Song et al., eq. 12), with noise level η."""
    ab_t, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    x0 = schedule.predict_x0(x_t, eps, t)
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)) ** 0.5 if eta > 0 else 0.0
    direction = max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5
    out = ab_prev ** 0.5 * x0 + direction * eps
    if sigma > 0:
        out = out + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return out


def consistency_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of latent-consistency (LCM) multistep sampling: take the model's clean estimate
    and noise it afresh to t_prev. LCM-distilled models are trained for exactly this; DDIM's
    deterministic direction term would carry their one-step error forward. (LCM's boundary
    coefficients c_skip, c_out differ from 0 and 1 by under 1e-5 on any grid of up to 50 steps,
    so the estimate is used as is.)"""
    x0 = schedule.predict_x0(x_t, eps, t)
    if t_prev < 0:
        return x0
    noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return schedule.add_noise(x0, noise, t_prev)


SAMPLERS = ("ddim", "lcm")


def sample(schedule: NoiseSchedule, eps_fn: EpsFn, x_t: torch.Tensor, t_start: int, steps: int,
           t_end: int = -1, eta: float = 0.0, generator: torch.Generator | None = None,
           cancelled: Callable[[], bool] = lambda: False, sampler: str = "ddim") -> torch.Tensor:
    """Walk the grid from ``t_start`` (a grid point) down to ``t_end`` (-1: clean data) with DDIM
    (noise level η) or, for latent-consistency models, LCM's multistep sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    grid = [g for g in schedule.grid(steps) if t_end < g <= t_start][::-1]
    x = x_t
    for i, t in enumerate(grid):
        if cancelled():
            raise Cancelled()
        t_prev = grid[i + 1] if i + 1 < len(grid) else t_end
        if sampler == "lcm":
            x = consistency_step(schedule, x, eps_fn(x, t), t, t_prev, generator)
        else:
            x = ddim_step(schedule, x, eps_fn(x, t), t, t_prev, eta, generator)
    return x


def invert(schedule: NoiseSchedule, eps_fn: EpsFn, x_t: torch.Tensor, t_start: int, t_end: int,
           steps: int, cancelled: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """Deterministic DDIM inversion from ``t_start`` up to ``t_end`` along the grid: the reverse
    of ``sample`` at η = 0, so that structure present at t_start survives to t_end."""
    grid = [g for g in schedule.grid(steps) if t_start <= g <= t_end]
    if not grid or grid[0] != t_start:
        grid = [t_start, *grid]
    x = x_t
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        if cancelled():
            raise Cancelled()
        eps = eps_fn(x, t)
        a_next, s_next = schedule.coefficients(t_next)
        x = a_next * schedule.predict_x0(x, eps, t) + s_next * eps
    return x
