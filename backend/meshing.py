"""Gaussians → triangle mesh: a density grid, marching cubes (scikit-image), then trimesh for the
clean-up and fast-simplification (through trimesh) for decimation to a face budget.

This is DreamGaussian's extraction: the density at a point is Σᵢ oᵢ·exp(−½ dᵢᵀ Σᵢ⁻¹ dᵢ), sampled on
a grid over the unit cube the object lives in, and its level set is the surface.
"""

from __future__ import annotations

import numpy as np
import torch

from .mesh import Mesh, MeshError
from .presets import MeshConfig
from .splat import activated

#: Grid cells per block side when evaluating the density: each block only sees the Gaussians
#: whose 3σ reach overlaps it.
BLOCK = 16


@torch.no_grad()
def density_grid(params: torch.nn.ParameterDict, resolution: int, bound: float = 1.0) -> np.ndarray:
    """(R, R, R) density at the cell centres of a grid over [−bound, bound]³, indexed [x, y, z]."""
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

    g = activated(params)
    means, opacities = g["means"].float(), g["opacities"].float()
    _, precis = _quat_scale_to_covar_preci(g["quats"].float(), g["scales"].float(), compute_covar=False, triu=False)
    reach = 3 * g["scales"].float().max(dim=1).values                        # 3σ along the longest axis
    axis = (torch.arange(resolution, device=means.device, dtype=torch.float32) + 0.5) / resolution * 2 * bound - bound
    out = torch.zeros(resolution, resolution, resolution, device=means.device)
    cell = 2 * bound / resolution
    for x0 in range(0, resolution, BLOCK):
        for y0 in range(0, resolution, BLOCK):
            for z0 in range(0, resolution, BLOCK):
                sl = [slice(s, min(s + BLOCK, resolution)) for s in (x0, y0, z0)]
                lo = torch.stack([axis[s][0] for s in sl]) - cell
                hi = torch.stack([axis[s][-1] for s in sl]) + cell
                near = ((means + reach[:, None] > lo) & (means - reach[:, None] < hi)).all(1).nonzero().squeeze(1)
                if not near.numel():
                    continue
                pts = torch.stack(torch.meshgrid(axis[sl[0]], axis[sl[1]], axis[sl[2]], indexing="ij"), -1)
                pts = pts.reshape(-1, 3)
                for part in near.split(2048):
                    d = pts[:, None, :] - means[part][None]                   # (P, n, 3)
                    q = torch.einsum("pni,nij,pnj->pn", d, precis[part], d)
                    dens = (opacities[part] * torch.exp(-0.5 * q)).sum(1)
                    out[sl[0], sl[1], sl[2]] += dens.reshape(out[sl[0], sl[1], sl[2]].shape)
    return out.cpu().numpy()


def surface(grid: np.ndarray, level: float, bound: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes on a density grid from ``density_grid``: vertices in world units and
    triangles wound so normals point out of the dense region."""
    from skimage.measure import marching_cubes

    if not float(grid.max()) > max(level, 1e-6):
        raise MeshError(f"no surface: the densest point ({float(grid.max()):.3g}) is below the extraction level "
                        f"{level:g}; the Gaussians faded away. Try another seed or more iterations")
    cell = 2 * bound / grid.shape[0]
    # Pad with empty space so surfaces touching the box still close.
    padded = np.pad(grid, 1, constant_values=0.0)
    verts, faces, _, _ = marching_cubes(padded, level, spacing=(cell, cell, cell), gradient_direction="descent")
    verts = verts - bound - cell / 2  # padding shifted indices by one; cell centres sit half a cell in
    return verts.astype(np.float32), faces.astype(np.int64)


def clean(verts: np.ndarray, faces: np.ndarray, cfg: MeshConfig, name: str) -> Mesh:
    """Merge duplicates, drop floaters, decimate to the face budget, and orient outward."""
    import trimesh

    tm = trimesh.Trimesh(verts, faces, process=True)
    parts = tm.split(only_watertight=False)
    if len(parts) > 1:
        largest = max(len(p.faces) for p in parts)
        tm = trimesh.util.concatenate([p for p in parts if len(p.faces) >= cfg.min_component * largest])
    if len(tm.faces) > cfg.face_budget:
        tm = tm.simplify_quadric_decimation(face_count=cfg.face_budget)
        tm.remove_unreferenced_vertices()
    trimesh.repair.fix_normals(tm, multibody=True)
    return Mesh(np.asarray(tm.vertices, np.float32), np.asarray(tm.faces, np.int64), None, up_axis="z", name=name)


def extraction_level(grid: np.ndarray, threshold: float) -> float:
    """The configured level, or half the peak density where the Gaussians stayed fainter than it:
    a faint object is still an object, and minutes of optimisation should not end in an error."""
    peak = float(grid.max())
    return threshold if peak > threshold else 0.5 * peak


def extract(params: torch.nn.ParameterDict, cfg: MeshConfig, name: str) -> tuple[Mesh, float]:
    """The mesh, and the level it was extracted at."""
    grid = density_grid(params, cfg.grid)
    level = extraction_level(grid, cfg.density_threshold)
    return clean(*surface(grid, level), cfg, name), level
