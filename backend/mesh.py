"""The triangle mesh a job textures and its validation (``mesh_file`` reads mesh files).

Blender meshes carry UVs per loop (face corner), and n-gons share loops between the triangles they
split into. The backend therefore works on per-corner UVs and, when it unwraps a mesh itself
(``unwrap``), returns per-loop UVs and re-derives the corners from them, so the baked texture
matches exactly what Blender will sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .protocol import MAX_TRIANGLES, UP_AXES


class MeshError(ValueError):
    """Bad mesh input; the message names the problem and the fix."""


@dataclass
class Mesh:
    positions: np.ndarray          # (V, 3) float32
    triangles: np.ndarray          # (T, 3) int64 vertex indices
    corner_uvs: np.ndarray | None  # (T, 3, 2) float32, or None when the mesh has no UVs
    tri_loops: np.ndarray | None = None  # (T, 3) Blender loop index of each corner
    loop_count: int = 0
    up_axis: str = "z"
    name: str = "mesh"
    paint: np.ndarray | None = None  # (T,) bool: the triangles a refine job may change; None: all
    # (3,) float64: where ``positions``' zero lies in the mesh file, for a mesh so far from the file's
    # origin (georeferenced, or laid out in a large scene) that float32 would blur it; None: at it.
    origin: np.ndarray | None = None

    @property
    def triangle_count(self) -> int:
        return int(self.triangles.shape[0])

    def uv_areas(self) -> np.ndarray:
        """Signed area of each triangle in UV space (T,): written out because numpy 2 no longer
        takes 2-D vectors in ``np.cross``."""
        uvs = self.corner_uvs.astype(np.float64)
        a, b = uvs[:, 1] - uvs[:, 0], uvs[:, 2] - uvs[:, 0]
        return a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]

    def area_normals(self) -> np.ndarray:
        """Each triangle's normal as wound, twice its area long (T, 3) float64: summed or clipped
        per view, they weigh each face by how much of it shows."""
        corners = self.positions[self.triangles].astype(np.float64)
        return np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])

    def validate(self) -> None:
        """Raise MeshError for meshes that cannot be textured; cheap, runs before any GPU work."""
        p, t = self.positions, self.triangles
        if p.ndim != 2 or p.shape[1] != 3 or t.ndim != 2 or t.shape[1] != 3:
            raise MeshError(f"mesh {self.name!r}: expected (V,3) positions and (T,3) triangles, "
                            f"got {p.shape} and {t.shape}")
        if t.shape[0] == 0:
            raise MeshError(f"mesh {self.name!r} has no faces: Kiln textures surfaces. "
                            "Add faces (in Blender: Edit Mode > Face > Fill), or texture another mesh")
        if t.shape[0] > MAX_TRIANGLES:
            raise MeshError(f"mesh {self.name!r} has {t.shape[0]:,} triangles, over Kiln's limit of "
                            f"{MAX_TRIANGLES:,}: reduce it first (in Blender: a Decimate modifier, then Apply)")
        if not np.isfinite(p).all():
            bad = int((~np.isfinite(p)).any(axis=1).sum())
            raise MeshError(f"mesh {self.name!r} has {bad} vertices with NaN or infinite coordinates: "
                            "fix or delete them (in Blender: Edit Mode > Mesh > Clean Up) before texturing")
        if t.min() < 0 or t.max() >= p.shape[0]:
            raise MeshError(f"mesh {self.name!r}: triangle indices out of range")
        if self.up_axis not in UP_AXES:
            raise MeshError(f"mesh {self.name!r}: up axis {self.up_axis!r} is not one of {', '.join(UP_AXES)} "
                            "(Blender's is 'z'; glTF and most OBJ files are 'y')")
        if self.tri_loops is not None:
            loops = self.tri_loops
            if loops.shape != t.shape or (loops.size and (loops.min() < 0 or loops.max() >= self.loop_count)):
                raise MeshError(f"mesh {self.name!r}: its face corners' loop indices do not fit its "
                                f"{self.loop_count} loops")
        if self.paint is not None:
            if self.paint.shape != (t.shape[0],):
                raise MeshError(f"mesh {self.name!r}: {self.paint.shape[0]} triangles marked to repaint, but it has "
                                f"{t.shape[0]}")
            if not self.paint.any():
                raise MeshError(f"mesh {self.name!r} has no faces selected to repaint: select them in Edit Mode, "
                                "or untick Only Selected Faces")
        extent = p.max(axis=0) - p.min(axis=0)
        if float(extent.max()) <= 0.0:
            raise MeshError(f"mesh {self.name!r} has zero size: all vertices coincide (in Blender, an object scaled "
                            "to 0 does this): give it a size, or deselect it")
        if self.corner_uvs is not None:
            if self.corner_uvs.shape != (t.shape[0], 3, 2):
                raise MeshError(f"mesh {self.name!r}: UVs of shape {self.corner_uvs.shape} "
                                f"do not match {t.shape[0]} triangles")
            if not np.isfinite(self.corner_uvs).all():
                raise MeshError(f"mesh {self.name!r} has NaN UVs: re-unwrap it (in Blender: UV > Smart UV Project) "
                                "or delete the UV map so Kiln unwraps it")


#: Faces meeting at a sharper angle than this keep a hard edge in the textured meshes Kiln writes,
#: as under Blender's Smooth by Angle.
SMOOTH_ANGLE_DEG = 30.0


def shaded_vertices(mesh: Mesh, smooth_angle_deg: float = SMOOTH_ANGLE_DEG
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The textured mesh as a file holds it: vertices (N, 3), their UVs (N, 2) and normals (N, 3),
    and faces (T, 3). A glTF mesh without normals is shaded flat, so a vase would show its facets:
    faces are smooth across edges gentler than ``smooth_angle_deg`` and hard across sharper ones (a
    box stays a box), wherever the mesh file split its vertices (at UV seams, or everywhere, as STL
    does). Corners that agree in place, UV and normal share a vertex."""
    import trimesh
    from trimesh.graph import connected_component_labels

    corners = mesh.positions[mesh.triangles].reshape(-1, 3).astype(np.float64)
    places, welded = np.unique(corners, axis=0, return_inverse=True)
    welded = welded.reshape(-1, 3)
    solid = trimesh.Trimesh(places, welded, process=False)
    smooth = solid.face_adjacency[solid.face_adjacency_angles < np.radians(smooth_angle_deg)]
    groups = connected_component_labels(smooth, node_count=len(welded))  # faces joined by smooth edges
    key = np.stack([welded.ravel(), np.repeat(groups, 3)], axis=1)
    shading, shared = np.unique(key, axis=0, return_inverse=True)
    weighted = np.cross(*(solid.triangles[:, [1, 2]] - solid.triangles[:, [0]]).transpose(1, 0, 2))  # area × normal
    per_corner = np.repeat(weighted, 3, axis=0)
    normals = np.zeros((len(shading), 3))
    np.add.at(normals, shared.ravel(), per_corner)
    around = np.zeros((len(places), 3))  # for a degenerate face alone in its group: its vertex's whole fan
    np.add.at(around, welded.ravel(), per_corner)
    flat = np.linalg.norm(normals, axis=1) < 1e-30
    normals[flat] = around[shading[flat, 0]]
    normals[np.linalg.norm(normals, axis=1) < 1e-30] = (0.0, 0.0, 1.0)  # glTF wants unit normals everywhere
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    uvs = mesh.corner_uvs.reshape(-1, 2).astype(np.float64)
    rows = np.column_stack([shared.ravel(), uvs])
    _, first, vertex = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    return (corners[first].astype(np.float32), uvs[first].astype(np.float32),
            normals[shared.ravel()[first]].astype(np.float32), vertex.reshape(-1, 3))
