"""Score distillation of a mesh texture: SDS (DreamFusion) and SSD (stable score distillation).

Each step renders K views (gradients flow through the VAE encoder for latent priors), noises them
to one t, asks the prior for the ε pair, and pulls the views along the estimator's residual with
the usual stop-gradient target ``x − w(t)·residual``.
"""

from __future__ import annotations

import torch

from . import estimators
from .presets import DistillConfig
from .texturing import MeshTexturer


class DistillTexturer(MeshTexturer):
    cfg: DistillConfig

    def timestep(self, i: int) -> int:
        cfg, T = self.cfg, self.schedule.num_train_timesteps
        lo = cfg.t_min * T
        hi = max(lo, cfg.t_max * T * self.strength)  # refine mode: less noise, smaller changes
        if cfg.anneal:
            frac = i / max(cfg.iterations - 1, 1)
            return int(round(hi + (lo - hi) * frac))
        return int(torch.randint(int(lo), int(hi) + 1, (1,), generator=self.generator,
                                 device=self.device).item())

    def optimise(self) -> None:
        cfg = self.cfg
        optimiser = torch.optim.Adam(self.texture.parameters(), lr=cfg.lr)
        for i in range(cfg.iterations):
            self.check_cancel()
            conditioning, raster = self.cameras(cfg.views)
            x = self.prior.encode(self.render(raster))
            t = self.timestep(i)
            noise = torch.randn(x.shape, generator=self.generator, device=self.device, dtype=x.dtype)
            with torch.no_grad():
                x_t = self.schedule.add_noise(x.detach(), noise, t)
                uncond, cond = self.prior.predict_eps(x_t, t, self.prompt_for(conditioning), conditioning)
                if cfg.estimator == "ssd":
                    residual = estimators.ssd_residual(uncond, cond, noise, t, cfg.tau, cfg.guidance)
                else:
                    residual = estimators.sds_residual(uncond, cond, noise, cfg.guidance)
                target = x.detach() - estimators.weight(self.schedule.alpha_bar(t), cfg.weighting) * residual
            loss = 0.5 * (x - target).square().sum() / x.shape[0]
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            self.step_done()
            if self.done % cfg.stream_every == 0:
                self.events.progress(self.done, self.total, f"{cfg.estimator.upper()} t={t}")
        self.events.progress(self.done, self.total, "finishing")
