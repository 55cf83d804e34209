"""What every texturing method shares: the mesh on the device, the texture, camera rings,
rendering, streaming, cancelling and the padded final texture. Methods add only their loop."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .cameras import FULL_RING, Cameras, facing_views, orbit, ring
from .events import Cancelled, TextureEvents
from .mesh import Mesh
from .prior import Prior, Prompts, Views
from .raster import Raster, interpolate, rasterize_views
from .texture import (PixelLookup, PyramidTexture, image_rows, inpaint, pad_islands, sample_image, seen_texels,
                      to_rgba8, uv_coverage)

if TYPE_CHECKING:
    from .reference import ReferenceViews
    from .unwrap import Unwrapping


def depth_maps(positions: torch.Tensor, triangles: torch.Tensor, cams: Cameras, raster: Raster) -> torch.Tensor:
    """Per-view depth as depth ControlNets and SD 2's depth model expect it: normalised inverse
    depth, near = 1, far = 0.1, background 0; (K, 1, H, W), top row first."""
    homogeneous = torch.cat([positions, torch.ones_like(positions[:, :1])], 1)
    view_depth = (homogeneous @ cams.mvp.transpose(1, 2))[..., 3]          # clip w = distance along the view
    maps = []
    for k in range(len(cams)):
        one = Raster(raster.tri_id[k:k + 1], raster.bary[k:k + 1])
        z = interpolate(view_depth[k][triangles][..., None], one)[0, ..., 0]
        inv = torch.where(one.mask[0], 1 / z.clamp_min(1e-6), torch.zeros_like(z))
        covered = inv[one.mask[0]]
        if covered.numel():
            lo, hi = covered.min(), covered.max()
            inv = torch.where(one.mask[0], 0.1 + 0.9 * (inv - lo) / (hi - lo).clamp_min(1e-8), inv)
        maps.append(inv)
    return image_rows(torch.stack(maps))


def facing_weights(positions: torch.Tensor, triangles: torch.Tensor, cams: Cameras, raster: Raster) -> torch.Tensor:
    """|cos| of the angle between each pixel's surface and its view ray, (K, 1, H, W), top row
    first, 0 where empty: grazing pixels stretch one pixel over many texels and would smear them."""
    corners = positions[triangles]                                         # (T, 3, 3)
    normals = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=1)
    normals = normals / normals.norm(dim=1, keepdim=True).clamp_min(1e-12)
    points = interpolate(corners, raster)                                  # (K, H, W, 3)
    rays = cams.eyes[:, None, None, :] - points
    rays = rays / rays.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = (normals[raster.tri_id.clamp_min(0)] * rays).sum(-1).abs() * raster.mask
    return image_rows(cos)


class MeshTexturer:
    def __init__(self, mesh: Mesh, prior: Prior, cfg: Any, texture_size: int, prompt: str, negative: str,
                 seed: int, events: TextureEvents, init_texture: torch.Tensor | None = None,
                 strength: float = 1.0, reference: "ReferenceViews | None" = None,
                 unwrapping: "Unwrapping | None" = None) -> None:
        """``init_texture`` (3, H, W) in [0, 1], rows bottom-up, turns on refine mode: the method
        starts from it, and ``strength`` in (0, 1] scales how much noise it may add (how far
        the result may move from it). ``reference``: an asset placed on the mesh whose views the
        first updates are also pulled toward (ReDream's warm-up; ``cfg.warmup``). ``unwrapping``:
        xatlas still at work on a mesh without UVs; the method starts without them (SIR's views
        sampled from pure noise need none) and waits for them at its first render."""
        if mesh.corner_uvs is None and unwrapping is None:
            raise ValueError("the mesh needs UVs before texturing (unwrap it first)")
        self.mesh, self.prior, self.cfg, self.events = mesh, prior, cfg, events
        self.reference = reference
        self.device = prior.device
        self.schedule = prior.schedule
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.prompts = Prompts(prior, prompt, negative)
        self.positions = torch.as_tensor(mesh.positions, device=self.device)
        self.triangles = torch.as_tensor(mesh.triangles, device=self.device)
        self.unwrapping = unwrapping
        self.corner_uvs: torch.Tensor | None = None
        self.unseen: list[Raster] = []  # views rasterised before the UVs came, counted in ``seen`` then
        if unwrapping is None:
            self.corner_uvs = torch.as_tensor(mesh.corner_uvs, dtype=torch.float32, device=self.device)
        self.texture = PyramidTexture(texture_size, self.device, init=init_texture)
        self.refine = init_texture is not None
        # Only Selected Faces: the other triangles keep the texture the job starts from. Their
        # pixels show it in every view, so the repainted faces are made to fit in with it.
        self.paint: torch.Tensor | None = None
        self.painted_texels: torch.Tensor | None = None
        self.focus: np.ndarray | None = None  # the repainted faces' corners, which the views frame
        self.arc, self.elevations = FULL_RING, cfg.elevations  # where views stand: where repainted faces show
        self.total = cfg.total_work(self.refine)
        self._kept: tuple[PixelLookup, torch.Tensor, torch.Tensor] | None = None  # per pixel: repainted?, kept colour
        if mesh.paint is not None:
            if not self.refine or self.corner_uvs is None:
                raise ValueError("repainting some faces needs the texture (and UVs) the others keep")
            self.paint = torch.as_tensor(mesh.paint, device=self.device)
            self.focus = mesh.positions[mesh.triangles[mesh.paint]].reshape(-1, 3)
            events.progress(0, self.total, "finding where the selected faces show")
            self.arc, self.elevations = facing_views(mesh, cfg.elevations, self.device)
            self.painted_texels = uv_coverage(self.corner_uvs[self.paint], texture_size)
        self.strength = strength if self.refine else 1.0
        # Texels the method's views have covered, on a grid no finer than a view's pixels (finer
        # would leave gaps between pixel centres).
        grid = min(texture_size, prior.resolution)
        self.seen = torch.zeros(grid, grid, dtype=torch.bool, device=self.device)
        self.done = 0
        self.last_sent = 0.0
        self._lookup: tuple[Raster, PixelLookup] | None = None

    def run(self) -> torch.Tensor:
        """Texture the mesh; returns the final padded texture (3, S, S) in [0, 1]."""
        self.optimise()
        self.wait_for_uvs()
        islands = uv_coverage(self.corner_uvs, self.texture.size)
        final = self.composed()
        if not self.refine:  # a refined texture already has colour where no view looked
            seen = F.interpolate(self.seen[None, None].float(), size=final.shape[-2:], mode="nearest")[0, 0] > 0
            if bool((seen & islands).any()):
                final = inpaint(final, seen & islands)
        final = pad_islands(final, islands, self.cfg.pad_texels)
        self.events.texture(to_rgba8(final), final=True)
        return final

    def optimise(self) -> None:
        raise NotImplementedError

    def check_cancel(self) -> None:
        if self.events.cancelled():
            raise Cancelled()

    def cameras(self, count: int) -> tuple[Views, Raster]:
        """``count`` cameras evenly spaced in azimuth from a random offset (round the side that
        repainted faces show), their raster, and — for priors that condition on it — each view's
        depth map."""
        az, el = ring(count, self.elevations, self.rng, self.cfg.elevation_jitter, self.arc)
        cams = orbit(self.mesh.positions, az, el, self.mesh.up_axis, device=self.device, focus=self.focus)
        raster = rasterize_views(self.positions, self.triangles, cams.mvp, self.prior.resolution)
        if self.corner_uvs is None:
            self.unseen.append(raster)
        else:
            self._see(raster)
        depth = depth_maps(self.positions, self.triangles, cams, raster) if getattr(self.prior, "wants_depth", False) \
            else None
        return Views(cams, depth=depth), raster

    def warming_up(self) -> bool:
        return self.reference is not None and self.reference.active(self.done, self.total)

    def _pixels(self, raster: Raster) -> PixelLookup:
        """The pixels ``raster``'s views cover, looked up once per set of views."""
        if self._lookup is None or self._lookup[0] is not raster:
            self._lookup = (raster, PixelLookup(self.corner_uvs, raster))
        return self._lookup[1]

    def _see(self, raster: Raster) -> None:
        """Count the texels the views cover."""
        self.seen |= seen_texels(self._pixels(raster), self.seen.shape[0])

    def wait_for_uvs(self) -> None:
        """The UVs xatlas has been making while the method started: wait for them (the artist sees
        so only if they are not there yet), send them, and count the texels earlier views saw."""
        if self.corner_uvs is not None:
            return
        if not self.unwrapping.done():
            self.events.progress(self.done, self.total, "unwrapping UVs (xatlas)")
        self.events.uvs(self.unwrapping.apply(self.events.cancelled), self.mesh.corner_uvs)
        self.corner_uvs = torch.as_tensor(self.mesh.corner_uvs, dtype=torch.float32, device=self.device)
        for raster in self.unseen:
            self._see(raster)
        self.unseen.clear()

    def render(self, raster: Raster) -> torch.Tensor:
        """The texture seen in ``raster``'s views."""
        self.wait_for_uvs()
        lookup = self._pixels(raster)
        if self.paint is None:
            return lookup.render(self.texture.sample, self.cfg.background)
        if self._kept is None or self._kept[0] is not lookup:  # once per set of views, like the lookup
            self._kept = (lookup, self.paint[lookup.triangle][:, None], sample_image(self.texture.start, lookup.uv))
        _, painted, kept = self._kept
        return lookup.render(lambda uv: torch.where(painted, self.texture.sample(uv), kept), self.cfg.background)

    def composed(self) -> torch.Tensor:
        """The full-size texture, (3, S, S); with Only Selected Faces, the texels of the faces not
        selected as the job found them."""
        texture = self.texture.compose()
        return texture if self.paint is None else torch.where(self.painted_texels, texture, self.texture.start)

    def step_done(self) -> None:
        """Count one texture update; stream the texture now and then, at most four times a
        second, so big textures never make streaming the bottleneck."""
        self.done += 1
        if self.done % self.cfg.stream_every:
            return
        now = time.monotonic()
        if now - self.last_sent < 0.25:
            return
        self.last_sent = now
        self.events.texture(to_rgba8(self.composed()), final=False)
