"""Score distillation of a mesh texture: SDS (DreamFusion) and SSD (stable score distillation).

Each step renders K views (gradients flow through the VAE encoder for latent priors), noises them
to one t, asks the prior for the ε pair, and pulls the views along the estimator's residual with
the usual stop-gradient target ``x − w(t)·residual``.
"""

from __future__ import annotations

from typing import Any

import torch

from . import estimators
from .cameras import Cameras
from .presets import DistillConfig
from .prior import Prior, Views
from .reference import ReferenceViews, distill_warmup
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
                 generator: torch.Generator, delta_x: torch.Tensor | None = None) -> torch.Tensor:
    """The SDS / SSD surrogate loss for encoded renders ``x`` (with grad): its gradient is
    w(t)·residual, the usual stop-gradient target trick. Shared by every representation.
    ``delta_x``, the encoded reference views from the same cameras, makes it ReDream's delta
    denoising: the residual there, at the same t and noise, is subtracted."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        residual = _residual(prior, cfg, x.detach(), t, noise, prompt, conditioning)
        if delta_x is not None:
            residual = residual - cfg.delta.weight * _residual(prior, cfg, delta_x, t, noise, prompt, conditioning)
        target = x.detach() - estimators.weight(prior.schedule.alpha_bar(t), cfg.weighting) * residual
    return 0.5 * (x - target).square().sum() / x.shape[0]


def _residual(prior: Prior, cfg: DistillConfig, x0: torch.Tensor, t: int, noise: torch.Tensor, prompt: Any,
              conditioning: Views) -> torch.Tensor:
    x_t = prior.schedule.add_noise(x0, noise, t)
    uncond, cond = prior.predict_eps(x_t, t, prompt, conditioning)
    if cfg.estimator == "ssd":
        return estimators.ssd_residual(uncond, cond, noise, t, cfg.tau, cfg.guidance)
    return estimators.sds_residual(uncond, cond, noise, cfg.guidance)


def delta_views(prior: Prior, reference: ReferenceViews | None, cfg: DistillConfig, step: int, cams: Cameras
                ) -> torch.Tensor | None:
    """The encoded reference views delta denoising compares against, on its steps; else None."""
    if reference is None or step % cfg.delta.every:
        return None
    with torch.no_grad():
        return prior.encode(reference.views(cams)[0])


class DistillTexturer(MeshTexturer):
    """``delta_denoising`` (with a reference) turns on ReDream's delta denoising."""

    cfg: DistillConfig

    def __init__(self, *args: Any, delta_denoising: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delta_reference = self.reference if delta_denoising else None

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
                                self.generator, delta_views(self.prior, self.delta_reference, cfg, i,
                                                            conditioning.cameras))
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
