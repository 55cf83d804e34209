"""Generate a new object from a prompt: 3D Gaussians → mesh → texture.

The Gaussians are optimised by SIR (default) or SDS/SSD through the same ``Prior`` interface and
the same SIR denoising and distillation loss the texturing engine uses. The mesh comes from their
density (``meshing``), is unwrapped with xatlas, its texture is fitted to renders of the Gaussians
("baking", SIR's reconstruction with the Gaussians as the target), and the texturing engine's
short SIR refinement finishes it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import meshing, splat
from .cameras import Cameras, concat, orbit_sphere, ring
from .distill import delta_views, distill_loss, timestep
from .events import Cancelled, TextureEvents
from .mesh import Mesh
from .presets import PRESETS, DistillConfig, GenerateConfig, SIRConfig
from .prior import Prior, Prompts, Views
from .reference import ReferenceViews, distill_warmup
from .sir import SIRTexturer, denoise, passes
from .unwrap import unwrap

#: The object lives in the ball of this radius at the origin; every camera frames it.
FRAME_RADIUS = 1.0
#: Previews carry at most this many Gaussians (the most opaque), so Blender's update stays cheap.
PREVIEW_POINTS = 8_000

Watch = Callable[[torch.nn.ParameterDict, int], None]


@dataclass
class Generated:
    mesh: Mesh                      # Z up, with corner UVs
    texture: torch.Tensor           # (3, S, S) in [0, 1], rows bottom-up
    splats: torch.nn.ParameterDict
    seconds: dict[str, float] = field(default_factory=dict)   # wall time per stage


class SplatOptimiser:
    """The Gaussians, their optimisers and gsplat's densify-and-prune strategy, and the SIR and
    distillation loops that update them."""

    def __init__(self, prior: Prior, cfg: GenerateConfig, prompts: Prompts, seed: int, events: TextureEvents,
                 total: int, watch: Watch | None = None, reference: ReferenceViews | None = None,
                 delta_denoising: bool = False) -> None:
        """``reference``: an asset placed in the object's frame; the Gaussians start on its
        surface and warm up toward its views (ReDream), and with ``delta_denoising`` SDS/SSD
        subtract the prior's residual on its views."""
        from gsplat import DefaultStrategy

        self.prior, self.cfg, self.prompts, self.events, self.total = prior, cfg, prompts, events, total
        self.watch, self.seed, self.reference = watch, seed, reference
        self.delta_reference = reference if delta_denoising else None
        self.schedule = cfg.schedule
        self.generator = torch.Generator(device=prior.device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        s = cfg.splats
        if reference is None:
            self.params = splat.sphere(s.count, s.radius, torch.Generator().manual_seed(seed), prior.device)
        else:
            self.params = splat.surface(*reference.asset.surface_samples(s.count, torch.Generator().manual_seed(seed)),
                                        prior.device)
        rates = {"means": s.lr_means, "scales": s.lr_scales, "quats": s.lr_quats, "opacities": s.lr_opacities,
                 "colors": s.lr_colors}
        self.optimizers = {k: torch.optim.Adam([self.params[k]], lr=lr, eps=1e-15) for k, lr in rates.items()}
        self.strategy = DefaultStrategy(refine_start_iter=0, refine_every=s.densify_every,
                                        refine_stop_iter=s.densify_until, grow_grad2d=s.grow_grad2d, absgrad=s.absgrad,
                                        reset_every=1 << 30)
        self.strategy.check_sanity(self.params, self.optimizers)
        self.state = self.strategy.initialize_state(scene_scale=s.radius)
        self.done = 0
        self.last_sent = 0.0

    def run(self) -> torch.nn.ParameterDict:
        """Optimise. gsplat's split draws from torch's global generator, so it is seeded here, in a
        forked state that the caller gets back unchanged."""
        devices = [self.prior.device] if self.prior.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            if isinstance(self.schedule, SIRConfig):
                self._sir(self.schedule)
            else:
                self._distill(self.schedule)
        return self.params

    def views(self, count: int) -> Views:
        az, el = ring(count, self.schedule.elevations, self.rng, self.schedule.elevation_jitter)
        return Views(orbit_sphere(np.zeros(3), FRAME_RADIUS, az, el, "z", device=self.prior.device))

    def render(self, views: Views) -> splat.Splats:
        s = self.cfg.splats
        return splat.render(self.params, views.cameras, self.prior.resolution, self.schedule.background,
                            absgrad=s.absgrad and self.done < s.densify_until)

    def _sir(self, cfg: SIRConfig) -> None:
        recent: deque[tuple[Cameras, torch.Tensor]] = deque(maxlen=cfg.replay)
        for t2, steps, count in passes(cfg, self.prior.schedule.num_train_timesteps):
            views = self.views(count)
            self.events.progress(self.done, self.total, "denoising views")
            with torch.no_grad():
                target = denoise(self.prior, cfg, self.render(views).images, t2, views,
                                 self.prompts.for_views(views.cameras), self.generator, self.events.cancelled)
            recent.append((views.cameras, target))
            cameras, targets = concat([c for c, _ in recent]), torch.cat([t for _, t in recent])
            for _ in range(steps):
                if len(recent) > 1:
                    pick = sorted(self.rng.choice(len(cameras), count, replace=False).tolist())
                    views, target = Views(cameras.select(pick)), targets[pick]
                out = self.render(views)
                loss = self._reduce(out.images - target)
                if self._warming_up():
                    loss = loss + cfg.warmup.weight * self._reduce(self.reference.difference(out.images, views.cameras,
                                                                                             None))
                self._update(loss, out, "reconstructing")

    def _reduce(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.abs().mean() if self.schedule.loss == "l1" else diff.square().mean()

    def _warming_up(self) -> bool:
        """ReDream's warm-up toward the reference's views, early on: the shape starts from the asset's."""
        return self.reference is not None and self.reference.active(self.done, self.schedule.total_work())

    def _distill(self, cfg: DistillConfig) -> None:
        T = self.prior.schedule.num_train_timesteps
        for i in range(cfg.iterations):
            views = self.views(cfg.views)
            out = self.render(views)
            t = timestep(cfg, i, T, self.generator)
            x = self.prior.encode(out.images)
            loss = distill_loss(self.prior, cfg, x, t, self.prompts.for_views(views.cameras), views, self.generator,
                                delta_views(self.prior, self.delta_reference, cfg, i, views.cameras))
            if self._warming_up():
                loss = loss + distill_warmup(self.reference.difference(out.images, views.cameras, None), x,
                                             cfg.warmup.weight)
            self._update(loss, out, f"{cfg.estimator.upper()} t={t}")

    def _update(self, loss: torch.Tensor, out: splat.Splats, phase: str) -> None:
        if self.events.cancelled():
            raise Cancelled()
        growing = len(self.params["means"]) < self.cfg.splats.max_count
        if growing:
            self.strategy.step_pre_backward(self.params, self.optimizers, self.state, self.done, out.info)
        loss.backward()
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if growing:
            self.strategy.step_post_backward(self.params, self.optimizers, self.state, self.done, out.info)
        self.done += 1
        if self.watch:
            self.watch(self.params, self.done)
        if self.done % self.schedule.stream_every == 0:
            self.events.progress(self.done, self.total, phase)
            now = time.monotonic()
            if now - self.last_sent >= 0.25:  # at most four previews a second
                self.last_sent = now
                self.events.points(*preview(self.params))


@torch.no_grad()
def preview(params: torch.nn.ParameterDict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The most opaque Gaussians as points: centres, 8-bit colours and radii."""
    g = splat.activated(params)
    keep = torch.argsort(g["opacities"], descending=True)[:PREVIEW_POINTS]
    return (g["means"][keep].float().cpu().numpy(),
            (g["colors"][keep] * 255).round().to(torch.uint8).cpu().numpy(),
            g["scales"][keep].float().mean(1).cpu().numpy())


class SplatBake(SIRTexturer):
    """Fit a mesh's texture to renders of the Gaussians it was extracted from: SIR's texture
    reconstruction, with the Gaussians in place of the denoised views."""

    def __init__(self, *args, splats: torch.nn.ParameterDict, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.splats = splats

    def optimise(self) -> None:
        for _ in range(self.cfg.iterations):
            self._iteration(0.0, self.cfg.recon_steps, self.cfg.views)

    def targets(self, raster, conditioning: Views, t2: float) -> torch.Tensor:
        self.events.progress(self.done, self.total, "baking the Gaussians into the texture")
        return splat.render(self.splats, conditioning.cameras, self.prior.resolution, self.cfg.background).images


class StageEvents(TextureEvents):
    """One stage of a generation job as seen by the job's events: progress offset into the job's
    total, and the stage's "final" texture demoted to a preview unless the stage is the last."""

    def __init__(self, outer: TextureEvents, offset: int, total: int, last: bool) -> None:
        self.outer, self.offset, self.total, self.last = outer, offset, total, last

    def progress(self, done: int, total: int, phase: str) -> None:
        self.outer.progress(self.offset + done, self.total, phase)

    def texture(self, rgba: torch.Tensor, final: bool) -> None:
        self.outer.texture(rgba, final and self.last)

    def log(self, text: str) -> None:
        self.outer.log(text)

    def cancelled(self) -> bool:
        return self.outer.cancelled()


def generate_object(prior: Prior, cfg: GenerateConfig, prompt: str, negative: str, seed: int,
                    events: TextureEvents, name: str = "kiln_object", watch: Watch | None = None,
                    reference: ReferenceViews | None = None, delta_denoising: bool = False) -> Generated:
    """The whole pipeline; deterministic for a seed on a given device. ``watch`` sees the
    Gaussians after every update (the benchmark scores them there); ``reference``, an asset
    placed in the object's frame (``reference.frame_box``), is where the Gaussians start and
    what they warm up toward (see ``SplatOptimiser``)."""
    seconds: dict[str, float] = {}
    total = cfg.total_work()
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    prompts = Prompts(prior, prompt, negative)
    optimiser = SplatOptimiser(prior, cfg, prompts, seed, events, total, watch, reference, delta_denoising)
    params = optimiser.run()
    lap("gaussians")
    done = cfg.schedule.total_work()
    events.progress(done, total, "extracting the mesh (marching cubes)")
    mesh, level = meshing.extract(params, cfg.mesh, name, prior.resolution, FRAME_RADIUS)
    if level < cfg.mesh.density_threshold:
        events.log(f"the Gaussians stayed faint (peak density {2 * level:.2g} < {cfg.mesh.density_threshold:g}): "
                   f"extracted the surface at half the peak instead; more iterations give a firmer shape")
    lap("extract")
    events.progress(done, total, "unwrapping UVs (xatlas)")
    unwrap(mesh, events.cancelled)
    lap("unwrap")
    events.generated(mesh)
    m = cfg.mesh
    bake_cfg = SIRConfig(views=m.bake_views, iterations=m.bake_rounds, recon_steps=m.bake_steps, init_recon_steps=0,
                         background=cfg.schedule.background, stream_every=m.bake_steps)
    refining = bool(m.refine_preset)
    texture = SplatBake(mesh, prior, bake_cfg, m.texture_size, prompt, negative, seed,
                        StageEvents(events, done, total, last=not refining), splats=params).run()
    done += bake_cfg.total_work()
    lap("bake")
    if refining:
        texture = SIRTexturer(mesh, prior, PRESETS["sir"][m.refine_preset], m.texture_size, prompt, negative, seed,
                              StageEvents(events, done, total, last=True), init_texture=texture,
                              strength=m.refine_strength).run()
        lap("refine")
    events.progress(total, total, "done")
    return Generated(mesh, texture, params, seconds)
