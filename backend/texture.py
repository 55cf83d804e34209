"""The optimised texture: a multi-resolution pyramid behind a sigmoid, plus UV-island padding.

A 2048² texture seen through eight 512² views gets gradients on a few percent of its texels. As a
sum of levels from full size down to 1², every rendered pixel also moves the coarse levels, so
texels no camera saw take the colour of their surroundings instead of staying grey. Views sample
each level directly at the pixel UVs, so the full-size texture is only composed when it is sent.

Texture rows run bottom-up (row 0 is v = 0), as in Blender's image pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .raster import Raster, rasterize

_COARSEST = 1


class PyramidTexture(torch.nn.Module):
    def __init__(self, size: int, device: torch.device | str, init: torch.Tensor | None = None) -> None:
        super().__init__()
        sizes = []
        s = size
        while s >= _COARSEST:
            sizes.append(s)
            s //= 2
        self.size = size
        self.levels = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(1, 3, s, s, device=device)) for s in sizes])
        self.start: torch.Tensor | None = None  # the existing texture at this size, (3, S, S)
        if init is not None:  # start from an existing texture (refine mode): all detail in level 0
            with torch.no_grad():
                self.start = F.interpolate(init[None].float().to(device), size=(size, size), mode="bilinear",
                                           antialias=True, align_corners=False)[0]
                self.levels[0].copy_(torch.logit(self.start.clamp(1e-3, 1 - 1e-3))[None])

    def sample(self, uv: torch.Tensor) -> torch.Tensor:
        """Colours at UVs of shape (N, 2) → (N, 3), differentiable in every level."""
        return torch.sigmoid(sum(_bilinear(level, uv) for level in self.levels))

    @torch.no_grad()
    def compose(self) -> torch.Tensor:
        """The full-size texture, (3, H, W) in [0, 1]."""
        logits = sum(F.interpolate(level, size=(self.size, self.size), mode="bilinear",
                                   align_corners=False) for level in self.levels)
        return torch.sigmoid(logits)[0]


#: On CUDA, a level's gradient is gathered in copies of at most this many texels in all (below).
_SPREAD_TEXELS = 1 << 18


def _bilinear(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of a (1, 3, H, W) image (rows bottom-up: v = 0 is row 0) at UVs (N, 2) → (N, 3).

    grid_sample's backward adds each point's gradient into its texels with atomics; on a coarse
    level a million pixels land on a handful of texels and serialise (29 % of an SIR job's GPU time
    on an H100). On CUDA the points are dealt round copies of the level, each sampling its own, and
    the copies' gradients are summed: the same function and gradient, without the pile-up."""
    copies = 1
    if image.is_cuda:
        copies = max(1, min(_SPREAD_TEXELS // (image.shape[-2] * image.shape[-1]), uv.shape[0]))
    return spread_grid_sample(image, uv, copies)


def spread_grid_sample(image: torch.Tensor, uv: torch.Tensor, copies: int) -> torch.Tensor:
    """``_bilinear`` with the points dealt round ``copies`` expanded copies of ``image``."""
    n = uv.shape[0]
    per = -(-n // copies)
    grid = uv * 2 - 1
    if per * copies > n:  # pad with copies of the first point; their outputs are dropped
        grid = torch.cat([grid, grid[:1].expand(per * copies - n, 2)])
    out = F.grid_sample(image.expand(copies, -1, -1, -1), grid.view(copies, 1, per, 2), mode="bilinear",
                        padding_mode="border", align_corners=False)   # (copies, 3, 1, per)
    return out.permute(0, 2, 3, 1).reshape(-1, 3)[:n]


def sample_image(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear colours of a fixed (3, H, W) texture (rows bottom-up) at UVs (N, 2) → (N, 3)."""
    return _bilinear(image[None].float(), wrap_uvs(uv))


def wrap_uvs(uv: torch.Tensor) -> torch.Tensor:
    """UVs outside the unit square wrapped into it, as Blender's Image Texture node (Repeat, its
    default and Kiln's) and glTF's default sampler read them: a tiled or offset UV map is textured
    as it will be shown. The closed square itself is kept, so a u of exactly 1 stays on its
    island's edge rather than jumping to the far side."""
    return torch.where((uv < 0) | (uv > 1), uv - uv.floor(), uv)


class PixelLookup:
    """The covered pixels of a set of views and the UVs they show. A method renders the same views
    for many texture updates in a row; finding the pixels once, rather than at every render, saves
    a full-frame gather per render and, on CUDA, the host sync that counting the pixels costs."""

    def __init__(self, corner_uvs: torch.Tensor, raster: Raster) -> None:
        self.shape = raster.tri_id.shape
        flat = raster.tri_id.reshape(-1)
        self.index = (flat >= 0).nonzero().squeeze(1)                     # covered pixels, row-major
        self.triangle = flat[self.index]                                   # each one's triangle
        corners = corner_uvs[self.triangle]                                # (N, 3, 2)
        bary = raster.bary.reshape(-1, 2)[self.index]
        b0, b1 = bary[:, 0:1], bary[:, 1:2]
        self.uv = wrap_uvs(b0 * corners[:, 0] + b1 * corners[:, 1] + (1 - b0 - b1) * corners[:, 2])

    def render(self, sampler: Callable[[torch.Tensor], torch.Tensor], background: float) -> torch.Tensor:
        """(K, 3, H, W) images, top row first, on a flat background; ``sampler`` maps UVs (N, 2) to
        colours (N, 3): ``PyramidTexture.sample``, or a fixed image's."""
        k, h, w = self.shape
        image = torch.full((k * h * w, 3), background, device=self.uv.device, dtype=torch.float32)
        image = image.index_copy(0, self.index, sampler(self.uv))
        return image.view(k, h, w, 3).permute(0, 3, 1, 2).flip(2)


def render(sampler: Callable[[torch.Tensor], torch.Tensor], corner_uvs: torch.Tensor, raster: Raster,
           background: float) -> torch.Tensor:
    """``PixelLookup.render`` for views rendered once."""
    return PixelLookup(corner_uvs, raster).render(sampler, background)


def image_rows(per_view: torch.Tensor) -> torch.Tensor:
    """A per-pixel map in raster orientation (K, H, W), row 0 at the bottom, as an image batch
    (K, 1, H, W) with the top row first, the orientation priors and rendered views use."""
    return per_view[:, None].flip(2)


def image_mask(raster: Raster) -> torch.Tensor:
    """The coverage mask in image orientation (top row first), (K, 1, H, W)."""
    return image_rows(raster.mask)


def uv_coverage(corner_uvs: torch.Tensor, size: int) -> torch.Tensor:
    """Which texels lie inside a UV island, (size, size) bool, rasterised in UV space; triangles
    outside the unit square land where ``wrap_uvs`` takes their pixels."""
    return uv_raster(corner_uvs, size, size)[0].mask[0]


def uv_raster(corner_uvs: torch.Tensor, height: int, width: int) -> tuple[Raster, torch.Tensor]:
    """(T, 3, 2) UV triangles rasterised over a texture of that size (row 0 at v = 0), and for
    each raster triangle id the triangle of ``corner_uvs`` it is a copy of (``_in_unit_square``)."""
    tris, index = _in_unit_square(corner_uvs.reshape(-1, 3, 2))
    corners = tris.reshape(-1, 2)
    clip = torch.cat([corners * 2 - 1, torch.zeros_like(corners[:, :1]), torch.ones_like(corners[:, :1])], 1)
    ids = torch.arange(corners.shape[0], device=corners.device).view(-1, 3)
    return rasterize(clip[None], ids, height, width), index


#: A triangle is drawn into at most this many unit squares per axis (a UV map tiled further
#: repeats each texel so often that coverage is whole long before).
_MAX_TILES = 16


def _in_unit_square(tris: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, 3, 2) UV triangles as copies within reach of the unit square: each moved by whole units
    until its lowest corner lies in [0, 1), and one more copy per further square it reaches into,
    moved back onto the unit square too; with the index of each copy's triangle. Triangles inside
    the square are returned as they are."""
    index = torch.arange(tris.shape[0], device=tris.device)
    if not bool(((tris < 0) | (tris > 1)).any()):
        return tris, index
    tris = tris - tris.amin(1, keepdim=True).floor()
    reach = tris.amax(1).ceil().clamp(1, _MAX_TILES).long()                # (T, 2) squares per axis
    chosen = [((reach[:, 0] > du) & (reach[:, 1] > dv), tris.new_tensor([du, dv]))
              for du in range(int(reach[:, 0].max())) for dv in range(int(reach[:, 1].max()))]
    return torch.cat([tris[mask] - shift for mask, shift in chosen]), torch.cat([index[mask] for mask, _ in chosen])


#: How far, in texels, ``compose_slots`` grows each island's composed colours past its edge, so
#: bilinear lookups at seams read them rather than the first slot's image beneath.
_COMPOSE_PAD = 2


def compose_slots(corner_uvs: torch.Tensor, base: torch.Tensor, slots: torch.Tensor,
                  sources: list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None]) -> torch.Tensor:
    """One texture, on ``corner_uvs``' map, showing what each face showed before: an object with
    several materials reads each face's colour from its own material. ``base`` (3, H, W) is the
    first textured material's image, kept where no source applies; ``slots`` (T,) each triangle's
    material slot; ``sources[k]`` slot k's image (3, h, w) with its (T, 3, 2) UVs (its own UV map
    may differ from the texture's), or its flat colour (3,), or None (keep ``base``). Composed at
    the largest image's size, so no slot's detail is lost to a smaller first image."""
    sizes = [base.shape[-2:], *(s[0].shape[-2:] for s in sources if isinstance(s, tuple))]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if base.shape[-2:] != (height, width):
        base = F.interpolate(base[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    raster, index = uv_raster(corner_uvs, height, width)
    covered = raster.mask[0]
    rows, cols = covered.nonzero(as_tuple=True)
    triangle = index[raster.tri_id[0][rows, cols]]
    b = raster.bary[0][rows, cols]
    texel_slots = slots[triangle]
    out = base.clone()
    for k, source in enumerate(sources):
        chosen = (texel_slots == k).nonzero().squeeze(1)
        if source is None or chosen.numel() == 0:
            continue
        if isinstance(source, tuple):
            image, uvs = source
            c = uvs[triangle[chosen]]
            b0, b1 = b[chosen, 0:1], b[chosen, 1:2]
            colours = sample_image(image, b0 * c[:, 0] + b1 * c[:, 1] + (1 - b0 - b1) * c[:, 2])
        else:
            colours = source.to(out.dtype).expand(chosen.numel(), 3)
        out[:, rows[chosen], cols[chosen]] = colours.T
    return pad_islands(out, covered, _COMPOSE_PAD)


@dataclass
class SlotTextures:
    """What each material slot of an object shows (``compose_slots``), for a refine job's start or
    a reference object's look. Composed when the job runs, on its device: for big maps it takes
    seconds the connection's thread should not wait. ``base`` is None (and every source a colour
    or None) for an object without images."""
    base: torch.Tensor | None
    corner_uvs: torch.Tensor | None
    slots: torch.Tensor
    sources: list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None]

    def compose(self, device: torch.device) -> torch.Tensor:
        sources = [s if s is None else tuple(t.to(device) for t in s) if isinstance(s, tuple) else s.to(device)
                   for s in self.sources]
        return compose_slots(self.corner_uvs.to(device), self.base.to(device), self.slots.to(device), sources)

    def corner_colours(self, default: np.ndarray) -> np.ndarray:
        """(T, 3, 3) colours of an object without images: each triangle its slot's, else ``default``."""
        table = np.stack([default if s is None else s.numpy() for s in self.sources] + [default]).astype(np.float32)
        slots = self.slots.numpy().clip(0, len(self.sources))  # a slot past the list has no source
        return np.ascontiguousarray(np.repeat(table[slots][:, None], 3, axis=1))


#: (triangle, texel) pairs ``shared_uv_area`` lets the rasteriser test: maps whose triangles stack
#: or tile over the square many times are checked at a coarser grid, so the check stays quick.
_CHECK_PAIRS = 1 << 24


def shared_uv_area(corner_uvs: torch.Tensor, size: int = 512) -> float:
    """The fraction of a UV map's area that lies on top of other faces' (mirrored, stacked or tiled
    islands), whose texels one texture must share: 1 − covered area / the triangles' summed area."""
    tris = corner_uvs.reshape(-1, 3, 2).double()
    edges = tris[:, 1:] - tris[:, :1]
    area = float((edges[:, 0, 0] * edges[:, 1, 1] - edges[:, 0, 1] * edges[:, 1, 0]).abs().sum() / 2)
    if area <= 0:
        return 0.0
    boxes = float((tris.amax(1) - tris.amin(1)).clamp(max=_MAX_TILES).prod(-1).sum())  # in unit squares
    size = max(16, min(size, int(math.sqrt(_CHECK_PAIRS / max(boxes, 1e-12)))))
    covered = float(uv_coverage(corner_uvs, size).float().mean())
    return max(0.0, 1 - covered / area)


def inpaint(image: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Pull-push fill: every texel not ``known`` gets the colour of the known texels around it,
    averaged over ever coarser neighbourhoods until some are found. (3, H, W) → (3, H, W)."""
    colour = image[None] * known[None, None]
    weight = known[None, None].to(image.dtype)
    pyramid = [(colour, weight)]
    while min(colour.shape[-2:]) > 1:
        colour, weight = F.avg_pool2d(colour, 2, ceil_mode=True), F.avg_pool2d(weight, 2, ceil_mode=True)
        pyramid.append((colour, weight))
    filled = pyramid[-1][0] / pyramid[-1][1].clamp_min(1e-8)
    for colour, weight in reversed(pyramid[:-1]):
        up = F.interpolate(filled, size=colour.shape[-2:], mode="bilinear", align_corners=False)
        filled = torch.where(weight > 0, colour / weight.clamp_min(1e-8), up)
    return torch.where(known[None], image, filled[0])


def seen_texels(pixels: PixelLookup, size: int) -> torch.Tensor:
    """Which cells of a size² grid over UV space the covered pixels of a set of views land in."""
    idx = (pixels.uv.clamp(0, 1 - 1e-6) * size).long()
    seen = torch.zeros(size, size, dtype=torch.bool, device=idx.device)
    seen[idx[:, 1], idx[:, 0]] = True
    return seen


def pad_islands(image: torch.Tensor, inside: torch.Tensor, texels: int) -> torch.Tensor:
    """Grow each UV island's border colours ``texels`` texels outward, so bilinear lookups and
    mipmaps near seams read island colours instead of bleeding in whatever lies between islands."""
    valid = inside[None, None].to(image.dtype)
    colour = image[None] * valid
    for _ in range(texels):
        count, summed = _box3(valid), _box3(colour)
        grow = (valid == 0) & (count > 0)
        colour = torch.where(grow, summed / count.clamp_min(1), colour)
        valid = torch.where(grow, torch.ones_like(valid), valid)
    return torch.where(valid > 0, colour, image[None])[0]


def _box3(image: torch.Tensor) -> torch.Tensor:
    """Sum over each texel's 3×3 neighbourhood (zeros outside), per channel: average pooling, five
    times faster on a CPU than a one-channel convolution (2048²: 90 against 432 ms)."""
    return F.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=True) * 9


def to_rgba8(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float → (H, W, 4) uint8 on the CPU, the wire format of texture updates."""
    rgb = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0)
    alpha = torch.full_like(rgb[..., :1], 255)
    return torch.cat([rgb, alpha], -1).cpu().contiguous()
