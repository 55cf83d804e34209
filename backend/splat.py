"""3D Gaussians: their parameters, and rendering them with gsplat on CUDA or in plain torch elsewhere.

The parameters live in a ``ParameterDict`` with gsplat's names and activations (log scales, raw
quaternions, opacity and colour logits), one Adam per tensor, so gsplat's own densify-and-prune
strategy (``gsplat.DefaultStrategy``) manages them on both paths.

The torch path reuses gsplat's reference projection (``gsplat.cuda._torch_impl``, pure torch) and
composites densely, every Gaussian against every pixel, front to back. That is exact and
differentiable but costs memory in Gaussians × pixels, so it is for the few thousand Gaussians and
small images of CPU runs and tests; gsplat's tiled CUDA rasteriser renders the real thing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .cameras import Cameras

#: gsplat's low-pass filter: every projected Gaussian covers at least about a pixel.
EPS_2D = 0.3
#: gsplat's compositing constants: alpha below ALPHA_MIN is ignored, alpha is capped at ALPHA_MAX,
#: and a pixel stops once its transmittance would drop under T_MIN.
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4
#: Tile edge of the torch path, in pixels (gsplat's default tile size).
TILE = 16


@dataclass
class Splats:
    """A render of K views: images and coverage top row first, and what densification needs."""

    images: torch.Tensor     # (K, 3, H, W) in [0, 1]
    alphas: torch.Tensor     # (K, 1, H, W)
    info: dict[str, Any]     # gsplat's meta: means2d (with grad), radii, width, height, n_cameras


def sphere(count: int, radius: float, generator: torch.Generator, device: torch.device | str) -> torch.nn.ParameterDict:
    """``count`` grey, faint, small Gaussians uniformly inside a ball: the usual start (DreamGaussian).
    σ is half the mean spacing. SIR hardly splits Gaussians, so this σ is about the width of its
    final ones (0.025 on bench/generate.py's table); starting at a quarter made them narrower
    (0.016) but the meshes worse (Chamfer, SIR at 10 passes, one run each: table 0.0125 -> 0.0150, vase
    0.0132 -> 0.0170)."""
    direction = torch.randn(count, 3, generator=generator)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
    r = radius * torch.rand(count, 1, generator=generator) ** (1 / 3)
    spacing = radius * (4 / 3 * math.pi / count) ** (1 / 3)  # mean distance between neighbours
    quats = torch.zeros(count, 4)
    quats[:, 0] = 1
    params = {
        "means": direction * r,
        "scales": torch.full((count, 3), math.log(spacing * 0.5)),
        "quats": quats,
        "opacities": torch.full((count,), math.log(0.1 / 0.9)),
        "colors": torch.zeros(count, 3) + 0.1 * torch.randn(count, 3, generator=generator),
    }
    return torch.nn.ParameterDict({k: torch.nn.Parameter(v.to(device)) for k, v in params.items()})


def surface(points: torch.Tensor, colours: torch.Tensor, area: float, device: torch.device | str
            ) -> torch.nn.ParameterDict:
    """Gaussians on a reference asset's surface (ReDream's start from a retrieved asset): one per
    point, coloured as the asset is there, so the first renders already show the asset. σ is half
    the points' spacing on a surface of ``area`` and opacity 0.8: measured on a column at 128 px
    with 4,096 points, the surface renders solid (interior error 2e-4) with the least spill past
    the silhouette (σ = spacing at opacity 0.5 spills twice as much)."""
    count = len(points)
    spacing = math.sqrt(area / count)
    quats = torch.zeros(count, 4)
    quats[:, 0] = 1
    params = {
        "means": points.float(),
        "scales": torch.full((count, 3), math.log(spacing / 2)),
        "quats": quats,
        "opacities": torch.full((count,), math.log(0.8 / 0.2)),
        "colors": torch.logit(colours.float().clamp(0.02, 0.98)),
    }
    return torch.nn.ParameterDict({k: torch.nn.Parameter(v.to(device)) for k, v in params.items()})


def activated(params: torch.nn.ParameterDict) -> dict[str, torch.Tensor]:
    return {"means": params["means"], "quats": params["quats"], "scales": torch.exp(params["scales"]),
            "opacities": torch.sigmoid(params["opacities"]), "colors": torch.sigmoid(params["colors"])}


def use_gsplat(device: torch.device) -> bool:
    """gsplat's CUDA kernels on CUDA; ``KILN_SPLAT=torch`` forces the reference path (tests)."""
    return device.type == "cuda" and os.environ.get("KILN_SPLAT", "") != "torch"


def render(params: torch.nn.ParameterDict, cams: Cameras, size: int, background: float,
           absgrad: bool = False) -> Splats:
    """Render K square views on a uniform grey ``background``. ``absgrad``: the backward pass also
    leaves ``info["means2d"].absgrad``, each Gaussian's screen-space gradient with every pixel's
    part taken in absolute value (AbsGS), for densification: a wide Gaussian over pixels that pull
    it different ways has a small gradient but a large absolute one."""
    g = activated(params)
    viewmats, ks = cams.view_opencv(), cams.intrinsics(size)
    backgrounds = torch.full((len(cams), 3), float(background), device=viewmats.device)
    if use_gsplat(viewmats.device):
        from gsplat import rasterization

        colors, alphas, info = rasterization(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"],
                                             viewmats, ks, size, size, eps2d=EPS_2D, packed=False,
                                             backgrounds=backgrounds, absgrad=absgrad)
    else:
        colors, alphas, info = _render_torch(g, viewmats, ks, size, backgrounds, absgrad=absgrad)
    return Splats(colors.permute(0, 3, 1, 2), alphas.permute(0, 3, 1, 2), info)


@torch.no_grad()
def render_depth(params: torch.nn.ParameterDict, cams: Cameras, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected camera depth (distance along the view axis, blended as colours are, divided by the
    coverage) and coverage, each (K, H, W): where each camera sees the surface of the Gaussians."""
    g = activated(params)
    viewmats, ks = cams.view_opencv(), cams.intrinsics(size)
    if use_gsplat(viewmats.device):
        from gsplat import rasterization

        depths, alphas, _ = rasterization(g["means"], g["quats"], g["scales"], g["opacities"], g["colors"], viewmats,
                                          ks, size, size, eps2d=EPS_2D, packed=False, render_mode="ED")
    else:
        backgrounds = torch.zeros(len(cams), 1, device=viewmats.device)
        depths, alphas, _ = _render_torch(g, viewmats, ks, size, backgrounds, depth=True)
        depths = depths / alphas.clamp_min(1e-10)  # gsplat's "ED"
    return depths[..., 0], alphas[..., 0]


def _render_torch(g: dict[str, torch.Tensor], viewmats: torch.Tensor, ks: torch.Tensor, size: int,
                  backgrounds: torch.Tensor, depth: bool = False, absgrad: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """gsplat's "RGB" render, or with ``depth`` its "D" (each Gaussian's camera depth blended in
    place of its colour; ``backgrounds`` then has one channel); ``absgrad`` as in ``render``."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(g["quats"], g["scales"], compute_preci=False, triu=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(g["means"], covars, viewmats, ks, size, size,
                                                                eps2d=EPS_2D)
    if absgrad:  # filled during the backward pass, as gsplat's kernels fill theirs
        means2d.absgrad = torch.zeros_like(means2d)
    colors, alphas = [], []
    for k in range(viewmats.shape[0]):
        visible = (radii[k] > 0).all(-1).nonzero().squeeze(1)
        order = visible[torch.argsort(depths[k, visible])]                    # front to back
        values = depths[k, order, None] if depth else g["colors"][order]
        rgb, acc = _composite(size, means2d[k, order], radii[k, order], conics[k, order], g["opacities"][order],
                              values, (means2d.absgrad[k], order) if absgrad else None)
        colors.append(rgb + (1 - acc) * backgrounds[k])
        alphas.append(acc)
    shape = (viewmats.shape[0], size, size)
    info = {"means2d": means2d, "radii": radii, "width": size, "height": size, "n_cameras": viewmats.shape[0],
            "gaussian_ids": None}
    return torch.stack(colors).reshape(*shape, -1), torch.stack(alphas).reshape(*shape, 1), info


def _composite(size: int, means2d: torch.Tensor, radii: torch.Tensor, conics: torch.Tensor,
               opacities: torch.Tensor, colors: torch.Tensor,
               absgrad: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back alpha compositing of depth-sorted 2D Gaussians, (H·W, C) and (H·W, 1).

    Tile by tile, against only the Gaussians whose 3σ box (gsplat's radii) reaches the tile, so
    memory and time scale with the overlaps rather than with Gaussians × pixels. ``absgrad``: an
    (N, 2) sum and the Gaussians' indices in it; the backward pass adds each pixel's gradient on
    each Gaussian's centre there, in absolute value."""
    device = means2d.device
    rgb = torch.zeros(size, size, colors.shape[1], device=device, dtype=colors.dtype)
    acc = torch.zeros(size, size, 1, device=device, dtype=colors.dtype)
    lo, hi = means2d - radii, means2d + radii
    for y0 in range(0, size, TILE):
        for x0 in range(0, size, TILE):
            y1, x1 = min(y0 + TILE, size), min(x0 + TILE, size)
            hit = ((hi[:, 0] > x0) & (lo[:, 0] < x1) & (hi[:, 1] > y0) & (lo[:, 1] < y1)).nonzero().squeeze(1)
            if not hit.numel():
                continue
            ys, xs = torch.meshgrid(torch.arange(y0, y1, device=device), torch.arange(x0, x1, device=device),
                                    indexing="ij")
            d = torch.stack([xs, ys], -1).reshape(-1, 1, 2) + 0.5 - means2d[hit][None]   # (p, n, 2)
            if absgrad is not None and d.requires_grad:
                d.register_hook(_absgrad_hook(*absgrad, hit))
            c = conics[hit]
            sigma = 0.5 * (c[:, 0] * d[..., 0] ** 2 + c[:, 2] * d[..., 1] ** 2) + c[:, 1] * d[..., 0] * d[..., 1]
            alpha = (opacities[hit] * torch.exp(-sigma)).clamp(max=ALPHA_MAX)
            alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
            before = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1]], 1), 1)
            weight = alpha * before * (before * (1 - alpha) > T_MIN)
            # In-place slice writes: autograd records each tile, and nothing copies the whole image.
            rgb[y0:y1, x0:x1] = (weight @ colors[hit]).reshape(y1 - y0, x1 - x0, -1)
            acc[y0:y1, x0:x1] = weight.sum(1).reshape(y1 - y0, x1 - x0, 1)
    return rgb.reshape(size * size, -1), acc.reshape(-1, 1)


def _absgrad_hook(total: torch.Tensor, ids: torch.Tensor, hit: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A hook on a tile's pixel-to-centre offsets (p, n, 2) that adds their gradients' absolute
    values, summed over the pixels, to the tile's Gaussians in ``total``; it leaves the gradient as is."""
    at = ids[hit]

    def hook(grad: torch.Tensor) -> None:
        total.index_add_(0, at, grad.abs().sum(0))
    return hook
