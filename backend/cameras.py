"""Orbit cameras around a mesh, as OpenGL-style view and projection matrices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .mesh import Mesh

UP_VECTORS = {"y": np.array([0.0, 1.0, 0.0]), "z": np.array([0.0, 0.0, 1.0])}  # one per protocol.UP_AXES


@dataclass
class Cameras:
    """A batch of K cameras; ``mvp`` maps world points to clip space, one (4,4) per camera."""

    mvp: torch.Tensor          # (K, 4, 4) float32
    azimuths: list[float]      # degrees
    elevations: list[float]    # degrees
    eyes: torch.Tensor         # (K, 3) camera positions in world space
    view: torch.Tensor         # (K, 4, 4) world → camera, OpenGL convention (looks down −z, y up)
    fov_y_deg: float

    def intrinsics(self, size: int) -> torch.Tensor:
        """(K, 3, 3) pinhole matrices for square ``size`` images, pixel centres at +0.5 (gsplat's)."""
        f = size / 2 / math.tan(math.radians(self.fov_y_deg) / 2)
        k = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]], dtype=torch.float32, device=self.mvp.device)
        return k.expand(len(self), 3, 3)

    def view_opencv(self) -> torch.Tensor:
        """World → camera with OpenCV's axes (looks down +z, y down), as gsplat expects."""
        flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], device=self.view.device))
        return flip @ self.view

    def __len__(self) -> int:
        return self.mvp.shape[0]

    def select(self, index: list[int]) -> Cameras:
        return Cameras(self.mvp[index], [self.azimuths[i] for i in index], [self.elevations[i] for i in index],
                       self.eyes[index], self.view[index], self.fov_y_deg)


def concat(batches: list[Cameras]) -> Cameras:
    """One batch of all these cameras (the same lens)."""
    return Cameras(torch.cat([c.mvp for c in batches]), [a for c in batches for a in c.azimuths],
                   [e for c in batches for e in c.elevations], torch.cat([c.eyes for c in batches]),
                   torch.cat([c.view for c in batches]), batches[0].fov_y_deg)


def perspective(fov_y_deg: float, near: float, far: float) -> np.ndarray:
    f = 1.0 / math.tan(math.radians(fov_y_deg) / 2)
    return np.array([
        [f, 0, 0, 0],
        [0, f, 0, 0],
        [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)],
        [0, 0, -1, 0],
    ])


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-8:  # looking straight along the up axis
        right = np.cross(forward, np.roll(up, 1))
    right /= np.linalg.norm(right)
    true_up = np.cross(right, forward)
    view = np.eye(4)
    view[0, :3], view[1, :3], view[2, :3] = right, true_up, -forward
    view[:3, 3] = -view[:3, :3] @ eye
    return view


#: How much closer than the whole mesh a part may be framed (``orbit``'s ``focus``): past this, a
#: view's pixels are finer than any texture Kiln makes of a part that small.
MAX_ZOOM = 20.0


def orbit(positions: np.ndarray, azimuths: list[float], elevations: list[float], up_axis: str,
          fov_y_deg: float = 40.0, margin: float = 1.1, device: str | torch.device = "cpu",
          focus: np.ndarray | None = None) -> Cameras:
    """Cameras on a sphere around the mesh's bounding box, each framing the whole mesh; or, with
    ``focus`` (some of the positions: the faces a job repaints), framing that part from outside the
    whole mesh through a longer lens, so a small part fills the views and no camera stands inside
    the rest."""
    points = positions if focus is None else focus
    lo, hi = points.min(axis=0).astype(np.float64), points.max(axis=0).astype(np.float64)
    center, radius = (lo + hi) / 2, max(float(np.linalg.norm(hi - lo)) / 2, 1e-6)
    if focus is None:
        return orbit_sphere(center, radius, azimuths, elevations, up_axis, fov_y_deg, margin, device)
    extent = float(np.linalg.norm(positions.astype(np.float64) - center, axis=1).max())
    return orbit_sphere(center, max(radius, extent / MAX_ZOOM), azimuths, elevations, up_axis, fov_y_deg, margin,
                        device, extent=extent)


def orbit_sphere(center: np.ndarray, radius: float, azimuths: list[float], elevations: list[float], up_axis: str,
                 fov_y_deg: float = 40.0, margin: float = 1.1, device: str | torch.device = "cpu",
                 extent: float = 0.0) -> Cameras:
    """Cameras looking at ``center``, each framing the sphere of ``radius`` around it. ``extent``:
    the radius around ``center`` that holds all the geometry; cameras stay out of it (half as far
    again), with a lens narrower than ``fov_y_deg`` where that puts them further away, and see all
    of it between their near and far planes.

    Azimuth 0 looks at the front (from -Y towards +Y for Z-up, from +Z for Y-up), so
    view-dependent prompts ("front view") mean the same thing as Blender's Front view.
    """
    center = np.asarray(center, np.float64)
    distance = radius * margin / math.sin(math.radians(fov_y_deg) / 2)
    if extent * 1.5 > distance:
        distance = extent * 1.5
        fov_y_deg = 2 * math.degrees(math.asin(min(radius * margin / distance, 1.0)))
    reach = max(radius, extent)
    proj = perspective(fov_y_deg, max(distance - reach * 1.5, distance * 0.01), distance + reach * 1.5)
    eyes = center + distance * directions(np.asarray(azimuths), np.asarray(elevations), up_axis)
    views = [look_at(eye, center, UP_VECTORS[up_axis]) for eye in eyes]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32, device=device)

    view = np.stack(views)
    return Cameras(tensor(proj @ view), list(azimuths), list(elevations), tensor(eyes), tensor(view), fov_y_deg)


def directions(azimuths: np.ndarray, elevations: np.ndarray, up_axis: str) -> np.ndarray:
    """(..., 3) unit vectors from the centre towards cameras at these azimuths and elevations
    (degrees, broadcast together)."""
    front = np.array([0.0, -1.0, 0.0]) if up_axis == "z" else np.array([0.0, 0.0, 1.0])
    side, up = np.array([1.0, 0.0, 0.0]), UP_VECTORS[up_axis]
    a, e = np.radians(azimuths)[..., None], np.radians(elevations)[..., None]
    return np.cos(e) * (np.cos(a) * front + np.sin(a) * side) + np.sin(e) * up


#: The views of a repainted part keep to the elevations and azimuths from which it shows at least
#: this share of the most it shows from any (``facing_views``).
FACING_SHARE = 0.25
FULL_RING = (0.0, 360.0)
#: ``facing_views`` looks from azimuths this far apart (10° cost the crate's repaint 1 dB in
#: ``bench/quality.py --repaint``), at this many pixels square: enough to count a part framed as
#: the job frames it. The cost is per triangle and view: 6.5 s for 330k faces on two CPU cores.
FACING_STEP_DEG, FACING_PIXELS = 5.0, 64


def facing_views(mesh: Mesh, elevations: tuple[float, ...], device: str | torch.device = "cpu"
                 ) -> tuple[tuple[float, float], tuple[float, ...]]:
    """Where views of the faces a job repaints (``mesh.paint``) should stand: the shortest arc of
    azimuths, as (first, width) in degrees, outside which they show less than ``FACING_SHARE`` of
    the most pixels they show from any, or ``FULL_RING`` for a part that shows all round; and those
    of ``elevations`` from which they show at least that share. Views of one side of a mesh from
    behind it, or of a cup's inside from below, see nothing to repaint, yet cost the prior as much
    as any. The part is counted in small renders framed as the job's views are, so what covers it
    counts; only its faces' front sides count, so an open mesh (a terrain) is not viewed from
    below. A closed mesh wound inside out (its signed volume negative: imported with flipped
    normals) has its faces' sides read the other way round; an open one has no inside."""
    from .raster import rasterize_views

    normals = mesh.area_normals()
    first_corners = mesh.positions[mesh.triangles[:, 0]].astype(np.float64)
    first_corners -= (mesh.positions.min(axis=0) + mesh.positions.max(axis=0)) / 2
    inside_out = closed(mesh.triangles) and float(np.einsum("ij,ij->", first_corners, normals)) < 0  # 6× volume
    candidates = np.arange(0.0, 360.0, FACING_STEP_DEG)
    az, el = np.meshgrid(candidates, np.asarray(elevations, np.float64))  # (E, A)
    focus = mesh.positions[mesh.triangles[mesh.paint]].reshape(-1, 3)
    cams = orbit(mesh.positions, az.ravel().tolist(), el.ravel().tolist(), mesh.up_axis, device=device, focus=focus)
    positions = torch.as_tensor(np.ascontiguousarray(mesh.positions), dtype=torch.float32, device=device)
    triangles = torch.as_tensor(np.ascontiguousarray(mesh.triangles), device=device)
    tri_id = rasterize_views(positions, triangles, cams.mvp, FACING_PIXELS).tri_id.flatten(1)  # (E·A, pixels)
    view, pixel = torch.nonzero(tri_id >= 0, as_tuple=True)
    hit = tri_id[view, pixel]
    painted = torch.as_tensor(mesh.paint, device=device)[hit]
    view, hit = view[painted], hit[painted]
    corner = positions[triangles[hit, 0]]
    normal = torch.as_tensor(normals, dtype=torch.float32, device=device)[hit]
    front = ((cams.eyes[view] - corner) * normal).sum(dim=1) > 0
    front ^= inside_out
    shown = torch.bincount(view[front], minlength=len(cams)).reshape(az.shape).cpu().numpy().astype(np.float64)
    if not shown.max() > 0:  # nothing shows from anywhere: nothing to aim at
        return FULL_RING, tuple(elevations)
    kept = shown.max(axis=1) >= FACING_SHARE * shown.max()
    shown = shown[kept].mean(axis=0)
    kept_elevations = tuple(e for e, keep in zip(elevations, kept) if keep)
    facing = np.flatnonzero(shown >= FACING_SHARE * shown.max())
    gaps = (np.roll(facing, -1) - facing) % len(candidates)  # steps from each facing azimuth to the next
    widest = int(gaps.argmax())
    width = (len(candidates) - gaps[widest] + 1) * FACING_STEP_DEG  # from the gap's far side round to its near one
    if len(facing) == len(candidates) or width >= 360.0:
        return FULL_RING, kept_elevations
    first = float((candidates[facing[(widest + 1) % len(facing)]] - FACING_STEP_DEG / 2) % 360.0)
    return (first, float(width)), kept_elevations


def closed(triangles: np.ndarray) -> bool:
    """Whether every edge of these triangles is shared by exactly two of them: only then does a
    signed volume say which side is inside."""
    edges = np.sort(triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1).astype(np.int64)
    _, counts = np.unique(edges[:, 0] * (int(triangles.max()) + 1) + edges[:, 1], return_counts=True)
    return bool((counts == 2).all())


def ring(count: int, elevations: tuple[float, ...], rng: np.random.Generator, jitter_deg: float = 0.0,
         arc: tuple[float, float] = FULL_RING) -> tuple[list[float], list[float]]:
    """Azimuths evenly spaced round the ``arc`` (first azimuth, width; see ``facing_views``) as round
    a ring, turned by an offset drawn from ``rng``; elevations cycle so top and bottom are seen,
    each moved by up to ``jitter_deg`` (also drawn from ``rng``, after the offset) so that passes
    over the same object see it from more than a few heights."""
    offset = float(rng.uniform(0, 1))
    first, width = arc
    az = [(first + width * ((offset + k / count) % 1.0)) % 360.0 for k in range(count)]
    el = [elevations[k % len(elevations)] for k in range(count)]
    if jitter_deg > 0:
        el = np.clip(np.add(el, rng.uniform(-jitter_deg, jitter_deg, count)), -89.0, 89.0).tolist()
    return az, el


def sphere_directions(count: int) -> tuple[list[float], list[float]]:
    """Azimuths and elevations spread evenly over the whole sphere (a Fibonacci lattice), top and
    bottom included, so together they see every side of an object. None is exactly at a pole,
    where an up-vector camera is undefined."""
    k = np.arange(count) + 0.5
    el = np.degrees(np.arcsin(1 - 2 * k / count))
    az = (k * 180.0 * (3 - math.sqrt(5))) % 360.0  # the golden angle
    return az.tolist(), el.tolist()


def view_suffix(azimuth: float, elevation: float) -> str:
    """DreamFusion's view-dependent prompt: overhead above 60° elevation, else front within 45° of
    azimuth 0, back beyond 135°, side between."""
    if elevation > 60:
        return "overhead view"
    a = abs((azimuth + 180) % 360 - 180)
    return "front view" if a < 45 else "back view" if a > 135 else "side view"
