"""Score distillation of a mesh texture: SDS (DreamFusion) and SSD (stable score distillation).

Each step renders K views (gradients flow through the VAE encoder for latent priors), noises them
to one t, asks the prior for the ε pair, and pulls the views along the estimator's residual with
the usual stop-gradient target ``x − w(t)·residual``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import estimators
from .presets import DistillConfig
from .prior import Prior, Views
from .reference import distill_warmup
from .texture import image_mask
from .texturing import MeshTexturer


def timestep(cfg: DistillConfig, i: int, num_train_timesteps: int, generator: torch.Generator,
             strength: float = 1.0) -> int:
    """t for step i: uniform in [t_min, t_max·strength]·T, or annealed linearly from high to low.
    Refine mode's strength < 1 means less noise, smaller changes."""
    lo = cfg.t_min * num_train_timesteps
    hi = max(lo, cfg.t_max * num_train_timesteps * strength)
    if cfg.anneal:
        return int(round(hi + (lo - hi) * i / max(cfg.iterations - 1, 1)))
    return int(torch.randint(int(lo), int(hi) + 1, (1,), generator=generator, device=generator.device).item())


def distill_loss(prior: Prior, cfg: DistillConfig, x: torch.Tensor, t: int, prompt: Any, conditioning: Views,
                 generator: torch.Generator) -> torch.Tensor:
    """The SDS / SSD surrogate loss for encoded renders ``x`` (with grad): its gradient is
    w(t)·residual, the usual stop-gradient target trick. Shared by every representation."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        x_t = prior.schedule.add_noise(x.detach(), noise, t)
        uncond, cond = prior.predict_eps(x_t, t, prompt, conditioning)
        if cfg.estimator == "ssd":
            residual = estimators.ssd_residual(uncond, cond, noise, t, cfg.tau, cfg.guidance)
        else:
            residual = estimators.sds_residual(uncond, cond, noise, cfg.guidance)
        target = x.detach() - estimators.weight(prior.schedule.alpha_bar(t), cfg.weighting) * residual
    return 0.5 * (x - target).square().sum() / x.shape[0]


class DistillTexturer(MeshTexturer):
    cfg: DistillConfig

    def optimise(self) -> None:
        cfg = self.cfg
        optimiser = torch.optim.Adam(self.texture.parameters(), lr=cfg.lr)
        for i in range(cfg.iterations):
            self.check_cancel()
            conditioning, raster = self.cameras(cfg.views)
            t = timestep(cfg, i, self.schedule.num_train_timesteps, self.generator, self.strength)
            images = self.render(raster)
            x = self.prior.encode(images)
            loss = distill_loss(self.prior, cfg, x, t, self.prompts.for_views(conditioning.cameras), conditioning,
                                self.generator)
            if self.warming_up():
                diff = self.reference.difference(images, conditioning.cameras, image_mask(raster).float())
                loss = loss + distill_warmup(diff, x, cfg.warmup.weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            self.step_done()
            if self.done % cfg.stream_every == 0:
                self.events.progress(self.done, self.total, f"{cfg.estimator.upper()} t={t}")
        self.events.progress(self.done, self.total, "finishing")
