"""SIR (MicroDreamer's score-based iterative reconstruction) for the texture of a fixed mesh.

Each iteration renders K views of the current texture, noises them to an annealed time t2,
denoises them back to images with a few DDIM steps conditioned on the prompt, and then fits the
texture to those frozen targets for N cheap pixel-space steps. Few network evaluations, many
texture updates: that is where SIR's speed over SDS comes from.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import diffusion
from .cameras import Cameras
from .presets import SIRConfig
from .prior import COND, UNCOND, Prior, Views, latent_shape
from .texture import image_mask
from .texturing import MeshTexturer, facing_weights


def t2_schedule(cfg: SIRConfig, num_train_timesteps: int) -> list[float]:
    """t2 for each iteration, annealed linearly from high to low (MicroDreamer's schedule)."""
    if cfg.iterations == 1:
        return [cfg.t_start * num_train_timesteps]
    return [num_train_timesteps * (cfg.t_start + (cfg.t_end - cfg.t_start) * i / (cfg.iterations - 1))
            for i in range(cfg.iterations)]


def passes(cfg: SIRConfig, num_train_timesteps: int, from_noise: bool = True, strength: float = 1.0
           ) -> list[tuple[float, int, int]]:
    """SIR's whole schedule as (t2, reconstruction steps, views) per pass: first views sampled
    from pure noise (unless refining an existing result), then the annealed iterations, their t2
    scaled by the refine strength. Every representation walks this one list."""
    first = [(float(num_train_timesteps), cfg.init_recon_steps, cfg.init_views or cfg.views)] if from_noise else []
    return first + [(t2 * strength, cfg.recon_steps, cfg.views) for t2 in t2_schedule(cfg, num_train_timesteps)]


def denoise(prior: Prior, cfg: SIRConfig, images: torch.Tensor, t2: float, conditioning: Views, prompt: Any,
            generator: torch.Generator, cancelled: Callable[[], bool]) -> torch.Tensor:
    """SIR's targets: the hybrid forward process — noise to t1, DDIM inversion (unconditional)
    from t1 to t2 — then DDIM sampling with CFG back to clean images. t1 = t2 means noise only;
    from pure noise (t2 ≥ T) the current images play no part. Shared by every representation."""
    schedule, steps = prior.schedule, cfg.ddim_steps

    def eps_uncond(x: torch.Tensor, t: int) -> torch.Tensor:
        return prior.predict_eps(x, t, prompt, conditioning, UNCOND)[0]

    def eps_cfg(x: torch.Tensor, t: int) -> torch.Tensor:
        if cfg.guidance == 1.0:  # guidance-free (few-step distilled models): one branch is enough
            return prior.predict_eps(x, t, prompt, conditioning, COND)[1]
        uncond, cond = prior.predict_eps(x, t, prompt, conditioning)
        return uncond + cfg.guidance * (cond - uncond)

    if t2 >= schedule.num_train_timesteps:  # the views' content plays no part: no encoder pass
        start = schedule.grid(steps)[-1]
        x = torch.randn(latent_shape(prior, images), generator=generator, device=images.device)
    else:
        x0 = prior.encode(images)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        start = schedule.snap(t2, steps)
        t1 = min(schedule.snap(cfg.t1_ratio * t2, steps), start)
        x = schedule.add_noise(x0, noise, t1)
        if t1 < start:
            x = diffusion.invert(schedule, eps_uncond, x, t1, start, steps, cancelled=cancelled)
    x = diffusion.sample(schedule, eps_cfg, x, start, steps, eta=cfg.eta, generator=generator, cancelled=cancelled,
                         sampler=cfg.sampler)
    return prior.decode(x)


class SIRTexturer(MeshTexturer):
    cfg: SIRConfig

    def optimise(self) -> None:
        for t2, steps, views in passes(self.cfg, self.schedule.num_train_timesteps, not self.refine, self.strength):
            self._iteration(t2, steps, views)

    def _iteration(self, t2: float, steps: int, views: int) -> None:
        conditioning, raster = self.cameras(views)
        mask = image_mask(raster).float()
        if self.cfg.normal_weighting > 0:
            mask = mask * facing_weights(self.positions, self.triangles, conditioning.cameras,
                                         raster) ** self.cfg.normal_weighting
        with torch.no_grad():
            target = self.targets(raster, conditioning, t2)
        self._reconstruct(raster, conditioning.cameras, target, mask, steps)

    def targets(self, raster, conditioning: Views, t2: float) -> torch.Tensor:
        """The images the texture is fitted to for a while: the current views, denoised. Views
        sampled from pure noise need no render of the texture, so they need no UVs either: a mesh
        still being unwrapped gets its first targets meanwhile."""
        self.events.progress(self.done, self.total, "denoising views")
        if t2 >= self.schedule.num_train_timesteps:
            views = torch.full((len(conditioning.cameras), 3, self.prior.resolution, self.prior.resolution),
                               self.cfg.background, device=self.device)
        else:
            views = self.render(raster)
        return denoise(self.prior, self.cfg, views, t2, conditioning, self.prompts.for_views(conditioning.cameras),
                       self.generator, self.events.cancelled)

    def _reconstruct(self, raster, cams: Cameras, target: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
        optimiser = torch.optim.Adam(self.texture.parameters(), lr=self.cfg.lr)
        denom = mask.sum().clamp_min(1) * 3

        def reduce(diff: torch.Tensor) -> torch.Tensor:
            return (diff.abs().sum() if self.cfg.loss == "l1" else diff.square().sum()) / denom

        for _ in range(steps):
            self.check_cancel()
            images = self.render(raster)
            loss = reduce((images - target) * mask)
            if self.warming_up():
                loss = loss + self.cfg.warmup.weight * reduce(self.reference.difference(images, cams, mask))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            self.step_done()
        self.events.progress(self.done, self.total, "reconstructing texture")
