"""Rasterisation: nvdiffrast on CUDA, a pure-torch rasteriser elsewhere, one output format.

The geometry of a texturing job never changes, so rasterisation runs without gradients and only
texture sampling is differentiable. Both backends return nvdiffrast's convention: row 0 is the
bottom of the image (clip-space y = -1), and perspective-correct barycentrics (b0, b1) weight
corners 0 and 1, with corner 2 getting 1 - b0 - b1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Candidate (triangle, pixel) pairs evaluated at once by the torch rasteriser; bounds its memory.
_PAIR_BUDGET = 1 << 22
_EMPTY = torch.iinfo(torch.int64).max


@dataclass
class Raster:
    tri_id: torch.Tensor   # (K, H, W) int64, -1 where no triangle covers the pixel
    bary: torch.Tensor     # (K, H, W, 2) float32

    @property
    def mask(self) -> torch.Tensor:
        return self.tri_id >= 0


def rasterize(clip: torch.Tensor, triangles: torch.Tensor, height: int, width: int,
              backend: str = "auto") -> Raster:
    """Rasterise (K, V, 4) clip-space vertices; ``backend`` is 'auto', 'nvdiffrast' or 'torch'."""
    if backend == "auto":
        backend = "nvdiffrast" if clip.is_cuda else "torch"
    with torch.no_grad():
        if backend == "nvdiffrast":
            return _rasterize_nvdiffrast(clip, triangles, height, width)
        return _stack([_rasterize_torch(c, triangles, height, width) for c in clip])


def rasterize_views(positions: torch.Tensor, triangles: torch.Tensor, mvp: torch.Tensor, size: int) -> Raster:
    """Project (V, 3) world positions with (K, 4, 4) camera matrices and rasterise K square views."""
    homogeneous = torch.cat([positions, torch.ones_like(positions[:, :1])], 1)
    return rasterize(homogeneous @ mvp.transpose(1, 2), triangles, size, size)


def _stack(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Raster:
    return Raster(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))


_NV_CONTEXT: object | None = None


def _nvdiffrast_context(device: torch.device) -> object:
    """nvdiffrast's CUDA context. nvdiffrast imports its JIT-built plugin by module name once torch
    has built it, but torch's extension loader (2.x) no longer registers what it loads under that
    name, so the import fails right after a good build ("No module named
    'nvdiffrast_plugin_...'"); putting the plugin's build folder on sys.path makes it importable."""
    import sys

    import nvdiffrast.torch as dr
    from torch.utils.cpp_extension import _get_build_directory

    try:
        return dr.RasterizeCudaContext(device=device)
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("nvdiffrast_plugin"):
            raise
        sys.path.insert(0, _get_build_directory(error.name, False))
        return dr.RasterizeCudaContext(device=device)


def _rasterize_nvdiffrast(clip: torch.Tensor, triangles: torch.Tensor, height: int, width: int) -> Raster:
    global _NV_CONTEXT
    import nvdiffrast.torch as dr

    if _NV_CONTEXT is None:
        _NV_CONTEXT = _nvdiffrast_context(clip.device)
    rast, _ = dr.rasterize(_NV_CONTEXT, clip.contiguous(), triangles.to(torch.int32).contiguous(),
                           resolution=[height, width])
    return Raster(rast[..., 3].to(torch.int64) - 1, rast[..., :2].contiguous())


def _rasterize_torch(clip: torch.Tensor, triangles: torch.Tensor, height: int, width: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rasterise one view: enumerate each triangle's bounding-box pixels in bounded chunks,
    keep the nearest by a packed (depth, triangle id) key, then recompute barycentrics once."""
    device = clip.device
    tris = triangles.to(device=device, dtype=torch.int64)
    w = clip[:, 3]
    valid = (w[tris] > 1e-8).all(dim=1)  # cameras orbit outside the mesh; drop anything behind
    ndc = clip[:, :3] / w.clamp_min(1e-8)[:, None]
    sx = (ndc[:, 0] * 0.5 + 0.5) * width - 0.5   # pixel centres sit on integers
    sy = (ndc[:, 1] * 0.5 + 0.5) * height - 0.5
    tx, ty = sx[tris], sy[tris]                  # (T, 3)
    x0 = tx.min(1).values.ceil().clamp(0, width - 1).long()
    x1 = tx.max(1).values.floor().clamp(-1, width - 1).long()
    y0 = ty.min(1).values.ceil().clamp(0, height - 1).long()
    y1 = ty.max(1).values.floor().clamp(-1, height - 1).long()
    bw, bh = (x1 - x0 + 1).clamp_min(0), (y1 - y0 + 1).clamp_min(0)
    area = (tx[:, 1] - tx[:, 0]) * (ty[:, 2] - ty[:, 0]) - (tx[:, 2] - tx[:, 0]) * (ty[:, 1] - ty[:, 0])
    keep = valid & (bw > 0) & (bh > 0) & (area.abs() > 1e-12)
    ids = torch.nonzero(keep).squeeze(1)
    counts = (bw * bh)[ids]
    best = torch.full((height * width,), _EMPTY, dtype=torch.int64, device=device)
    ends = torch.cumsum(counts, 0)
    start = 0
    while start < ids.numel():
        base = int(ends[start - 1]) if start else 0
        stop = int(torch.searchsorted(ends, base + _PAIR_BUDGET, right=True))
        stop = max(stop, start + 1)
        _scatter_chunk(ids[start:stop], counts[start:stop], tx, ty, ndc[:, 2], tris, x0, y0, bw, area,
                       width, best)
        start = stop
    hit = best != _EMPTY
    tri_id = torch.full((height * width,), -1, dtype=torch.int64, device=device)
    tri_id[hit] = best[hit] & 0xFFFFFFFF
    bary = torch.zeros((height * width, 2), dtype=torch.float32, device=device)
    pix = torch.nonzero(hit).squeeze(1)
    if pix.numel():
        t = tri_id[pix]
        l0, l1, l2 = _edge_weights(pix % width, pix // width, tx[t], ty[t], area[t])
        persp = torch.stack([l0 / w[tris[t, 0]], l1 / w[tris[t, 1]], l2 / w[tris[t, 2]]], 1)
        persp = persp / persp.sum(1, keepdim=True)
        bary[pix] = persp[:, :2]
    return tri_id.view(height, width), bary.view(height, width, 2)


def _edge_weights(px: torch.Tensor, py: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                  area: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Screen-space barycentrics of pixel centres (px, py) in triangles with corners (tx, ty)."""
    px, py = px.to(tx.dtype), py.to(tx.dtype)
    l0 = ((tx[:, 1] - px) * (ty[:, 2] - py) - (tx[:, 2] - px) * (ty[:, 1] - py)) / area
    l1 = ((tx[:, 2] - px) * (ty[:, 0] - py) - (tx[:, 0] - px) * (ty[:, 2] - py)) / area
    return l0, l1, 1.0 - l0 - l1


def _scatter_chunk(ids: torch.Tensor, counts: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                   z: torch.Tensor, tris: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor,
                   bw: torch.Tensor, area: torch.Tensor, width: int, best: torch.Tensor) -> None:
    total = int(counts.sum())
    owner = torch.repeat_interleave(torch.arange(ids.numel(), device=ids.device), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=ids.device) - first[owner]
    t = ids[owner]
    px = x0[t] + local % bw[t]
    py = y0[t] + local // bw[t]
    l0, l1, l2 = _edge_weights(px, py, tx[t], ty[t], area[t])
    eps = -1e-6
    inside = (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
    depth = l0 * z[tris[t, 0]] + l1 * z[tris[t, 1]] + l2 * z[tris[t, 2]]
    inside &= (depth >= -1.0) & (depth <= 1.0)
    if not bool(inside.any()):
        return
    t, px, py, depth = t[inside], px[inside], py[inside], depth[inside]
    # Positive float32 bit patterns sort like the floats, so (depth bits << 32 | triangle id) is a
    # z-buffer key whose minimum is the nearest triangle, ties going to the lower id.
    depth_bits = ((depth + 1.0) * 0.5).to(torch.float32).view(torch.int32).to(torch.int64)
    key = (depth_bits << 32) | t
    best.scatter_reduce_(0, py * width + px, key, reduce="amin")


def interpolate(values: torch.Tensor, raster: Raster) -> torch.Tensor:
    """Interpolate per-corner values (T, 3, C) over the covered pixels; zeros elsewhere."""
    tri = raster.tri_id.clamp_min(0)
    corners = values[tri]                                   # (K, H, W, 3, C)
    b0, b1 = raster.bary[..., 0:1], raster.bary[..., 1:2]
    out = b0 * corners[..., 0, :] + b1 * corners[..., 1, :] + (1 - b0 - b1) * corners[..., 2, :]
    return out * raster.mask[..., None]
