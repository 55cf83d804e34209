"""SIR (MicroDreamer's score-based iterative reconstruction) for the texture of a fixed mesh.

Each iteration renders K views of the current texture, noises them to an annealed time t2,
denoises them back to images with a few DDIM steps conditioned on the prompt, and then fits the
texture to those frozen targets for N cheap pixel-space steps. Few network evaluations, many
texture updates: that is where SIR's speed over SDS comes from.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import diffusion
from .cameras import orbit, ring
from .events import Cancelled, TextureEvents
from .mesh import Mesh
from .presets import SIRConfig
from .prior import Prior, Views
from .raster import rasterize_views
from .texture import PyramidTexture, image_mask, pad_islands, render, to_rgba8, uv_coverage


def t2_schedule(cfg: SIRConfig, num_train_timesteps: int) -> list[float]:
    """t2 for each iteration, annealed linearly from high to low (MicroDreamer's schedule)."""
    if cfg.iterations == 1:
        return [cfg.t_start * num_train_timesteps]
    return [num_train_timesteps * (cfg.t_start + (cfg.t_end - cfg.t_start) * i / (cfg.iterations - 1))
            for i in range(cfg.iterations)]


class SIRTexturer:
    def __init__(self, mesh: Mesh, prior: Prior, cfg: SIRConfig, texture_size: int,
                 prompt: str, negative: str, seed: int, events: TextureEvents) -> None:
        if mesh.corner_uvs is None:
            raise ValueError("the mesh needs UVs before texturing (unwrap it first)")
        self.mesh, self.prior, self.cfg, self.events = mesh, prior, cfg, events
        self.device = prior.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.embeds = prior.encode_prompt(prompt, negative)
        self.positions = torch.as_tensor(mesh.positions, device=self.device)
        self.triangles = torch.as_tensor(mesh.triangles, device=self.device)
        self.corner_uvs = torch.as_tensor(mesh.corner_uvs, dtype=torch.float32, device=self.device)
        self.texture = PyramidTexture(texture_size, self.device)
        self.schedule = prior.schedule
        self.done = 0
        self.total = cfg.total_work()
        self.last_sent = 0.0

    def run(self) -> torch.Tensor:
        """Texture the mesh; returns the final padded texture (3, S, S) in [0, 1]."""
        cfg = self.cfg
        T = self.schedule.num_train_timesteps
        self._iteration(float(T), cfg.init_recon_steps)  # views sampled from pure noise
        for t2 in t2_schedule(cfg, T):
            self._iteration(t2, cfg.recon_steps)
        final = pad_islands(self.texture.compose(), uv_coverage(self.corner_uvs, self.texture.size),
                            cfg.pad_texels)
        self.events.texture(to_rgba8(final), final=True)
        return final

    def _check_cancel(self) -> None:
        if self.events.cancelled():
            raise Cancelled()

    def _iteration(self, t2: float, steps: int) -> None:
        cfg = self.cfg
        az, el = ring(cfg.views, float(self.rng.uniform(0, 360)), cfg.elevations)
        cams = orbit(self.mesh.positions, az, el, self.mesh.up_axis, device=self.device)
        raster = rasterize_views(self.positions, self.triangles, cams.mvp, self.prior.resolution)
        mask = image_mask(raster).float()
        self.events.progress(self.done, self.total, "denoising views")
        with torch.no_grad():
            views = render(self.texture.sample, self.corner_uvs, raster, cfg.background)
            target = self._denoise(views, t2, Views(cams))
        self._reconstruct(raster, target, mask, steps)

    def _denoise(self, views: torch.Tensor, t2: float, conditioning: Views) -> torch.Tensor:
        """The hybrid forward process — noise to t1, DDIM inversion (unconditional) from t1 to t2 —
        then DDIM sampling with CFG back to clean images. t1 = t2 means noise only; from pure
        noise (t2 ≥ T) the current views play no part."""
        prior, schedule, cfg = self.prior, self.schedule, self.cfg
        steps = cfg.ddim_steps

        def eps_uncond(x: torch.Tensor, t: int) -> torch.Tensor:
            return prior.predict_eps(x, t, self.embeds, conditioning)[0]

        def eps_cfg(x: torch.Tensor, t: int) -> torch.Tensor:
            uncond, cond = prior.predict_eps(x, t, self.embeds, conditioning)
            return uncond + cfg.guidance * (cond - uncond)

        x0 = prior.encode(views)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device, dtype=x0.dtype)
        if t2 >= schedule.num_train_timesteps:
            start, x = schedule.grid(steps)[-1], noise
        else:
            start = schedule.snap(t2, steps)
            t1 = min(schedule.snap(cfg.t1_ratio * t2, steps), start)
            x = schedule.add_noise(x0, noise, t1)
            if t1 < start:
                x = diffusion.invert(schedule, eps_uncond, x, t1, start, steps, cancelled=self.events.cancelled)
        x = diffusion.sample(schedule, eps_cfg, x, start, steps, eta=cfg.eta, generator=self.generator,
                             cancelled=self.events.cancelled)
        return prior.decode(x)

    def _reconstruct(self, raster, target: torch.Tensor, mask: torch.Tensor, steps: int) -> None:
        cfg = self.cfg
        optimiser = torch.optim.Adam(self.texture.parameters(), lr=cfg.lr)
        denom = mask.sum().clamp_min(1) * 3
        for _ in range(steps):
            self._check_cancel()
            pred = render(self.texture.sample, self.corner_uvs, raster, cfg.background)
            diff = (pred - target) * mask
            loss = (diff.abs().sum() if cfg.loss == "l1" else diff.square().sum()) / denom
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            self.done += 1
            if self.done % cfg.stream_every == 0:
                self._stream()
        self.events.progress(self.done, self.total, "reconstructing texture")

    def _stream(self) -> None:
        """Send the texture now and then; at most four times a second, so big textures never
        make streaming the bottleneck."""
        now = time.monotonic()
        if now - self.last_sent < 0.25:
            return
        self.last_sent = now
        self.events.texture(to_rgba8(self.texture.compose()), final=False)
