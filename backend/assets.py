"""Reference assets: a textured mesh from the artist's library (or their selected object), placed in
the frame of the mesh being made and rendered from the method's cameras.

ReDream's warm-up compares the method's views with the asset's views from the same cameras, so the
asset must sit where the result will: same up axis, same bounding-box centre and diagonal (the
diagonal is what ``cameras.orbit`` frames by), turned about the up axis so its front faces the
front. Colour comes from the asset's base-colour image through its UVs, else from its vertex
colours, else from its material's flat colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .cameras import Cameras
from .mesh import Mesh
from .mesh_file import flat_colour, is_placeholder, load_mesh_file
from .raster import rasterize_views
from .texture import SlotTextures, image_mask, render, sample_image

#: File types the library indexes and the warm-up reads (trimesh's loaders).
ASSET_SUFFIXES = (".glb", ".gltf", ".obj", ".ply")


@dataclass
class Asset:
    mesh: Mesh
    # (3, H, W) in [0, 1], rows bottom-up, read through UVs; an artist's object with several
    # materials brings them to compose in the job (``resolved``)
    texture: torch.Tensor | SlotTextures | None = None
    corner_colours: np.ndarray | None = None   # (T, 3, 3) in [0, 1] where there is no texture
    coloured: bool = True  # False for a file with no colours of its own (no texture, vertex colours or material)

    def resolved(self, device: torch.device) -> "Asset":
        """This asset with its texture composed, if it came as several materials' (``SlotTextures``)."""
        if isinstance(self.texture, SlotTextures):
            return replace(self, texture=self.texture.compose(device))
        return self

    def placed(self, positions: np.ndarray, up_axis: str, yaw_deg: float = 0.0) -> "Asset":
        """This asset converted to ``up_axis``, turned ``yaw_deg`` about it, and fitted to the bounding
        box of ``positions`` (centre and diagonal)."""
        p = to_up_axis(self.mesh.positions.astype(np.float64), self.mesh.up_axis, up_axis)
        p = p @ _yaw(yaw_deg, up_axis).T
        lo, hi = p.min(0), p.max(0)
        t_lo, t_hi = positions.min(0).astype(np.float64), positions.max(0).astype(np.float64)
        scale = np.linalg.norm(t_hi - t_lo) / max(np.linalg.norm(hi - lo), 1e-12)
        p = (p - (lo + hi) / 2) * scale + (t_lo + t_hi) / 2
        return replace(self, mesh=replace(self.mesh, positions=p.astype(np.float32), up_axis=up_axis))

    def render(self, cams: Cameras, size: int, background: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 3, H, W) images, top row first, and their (K, 1, H, W) coverage mask."""
        device = cams.mvp.device
        raster = rasterize_views(torch.as_tensor(self.mesh.positions, device=device),
                                 torch.as_tensor(self.mesh.triangles, device=device), cams.mvp, size)
        if self.texture is not None:
            texture = self.texture.to(device)
            images = render(lambda uv: sample_image(texture, uv),
                            torch.as_tensor(self.mesh.corner_uvs, device=device), raster, background)
        else:
            # The "UVs" interpolated here are the colours themselves; the sampler passes them on.
            images = render(lambda colour: colour, torch.as_tensor(self.corner_colours, device=device), raster,
                            background)
        return images, image_mask(raster).float()


    def surface_samples(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``count`` points spread over the surface by area, (N, 3), the colours the asset shows
        there, (N, 3) in [0, 1], and the surface's area: what a generation starts its Gaussians from."""
        corners = torch.as_tensor(self.mesh.positions, dtype=torch.float32)[torch.as_tensor(self.mesh.triangles)]
        area = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=1).norm(dim=1)
        tri = torch.multinomial(area / area.sum(), count, replacement=True, generator=generator)
        u, v = torch.rand(count, generator=generator), torch.rand(count, generator=generator)
        outside = u + v > 1  # fold the unit square onto the triangle
        u, v = torch.where(outside, 1 - u, u), torch.where(outside, 1 - v, v)
        bary = torch.stack([1 - u - v, u, v], 1)[:, :, None]
        points = (bary * corners[tri]).sum(1)
        if self.texture is not None:
            uvs = (bary * torch.as_tensor(self.mesh.corner_uvs, dtype=torch.float32)[tri]).sum(1)
            colours = sample_image(self.texture, uvs)
        else:
            colours = (bary * torch.as_tensor(self.corner_colours, dtype=torch.float32)[tri]).sum(1)
        return points, colours, float(area.sum()) / 2


def to_up_axis(positions: np.ndarray, source: str, target: str) -> np.ndarray:
    """Y-up (glTF, OBJ by custom) ↔ Z-up (Blender), as Blender's glTF importer turns them."""
    if source == target:
        return positions
    if source == "y":
        return positions[:, [0, 2, 1]] * np.array([1, -1, 1])
    return positions[:, [0, 2, 1]] * np.array([1, 1, -1])


def _yaw(deg: float, up_axis: str) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if up_axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def load_asset(path: Path) -> Asset:
    """Read a library file; MeshError (naming the file and what is wrong) for anything unusable."""
    mesh, loaded = load_mesh_file(path)
    mesh.validate()
    texture = base_colour(loaded)
    if texture is not None and mesh.corner_uvs is not None:
        return Asset(mesh, texture=texture)
    visual = loaded.visual
    material = getattr(visual, "material", None)
    if getattr(visual, "kind", None) == "vertex":
        colours = np.asarray(visual.vertex_colors, np.float32)[:, :3] / 255
    else:
        colours = np.broadcast_to(flat_colour(material), (len(mesh.positions), 3))
    return Asset(mesh, corner_colours=np.ascontiguousarray(colours[mesh.triangles]),
                 coloured=getattr(visual, "kind", None) == "vertex"
                 or (material is not None and not is_placeholder(getattr(material, "image", None))))


#: PIL's modes for one channel of more than 8 bits, and what a full-scale value is in each: 16-bit
#: PNGs open as I;16 (or I, in older Pillow), float TIFFs as F, which hold [0, 1] already.
_WIDE_GREY = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def image_rgb(image: object) -> np.ndarray:
    """A PIL image as (H, W, 3) float32 in [0, 1], rows bottom-up as UVs run. Wide greys are
    scaled by their own full scale: PIL's conversion to RGB clips them at 255, which would turn a
    16-bit texture or mask white."""
    if image.mode in _WIDE_GREY:
        grey = np.clip(np.asarray(image, np.float32) / _WIDE_GREY[image.mode], 0.0, 1.0)
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:  # a palette's transparency goes through RGBA, as PIL asks
        rgb = np.asarray((image.convert("RGBA") if image.mode == "P" else image).convert("RGB"), np.float32) / 255
    return np.ascontiguousarray(rgb[::-1])  # image rows top-down → bottom-up


def texture_tensor(image: object) -> torch.Tensor:
    """A PIL image as the (3, H, W) float texture a job reads (``image_rgb``)."""
    return torch.from_numpy(image_rgb(image)).permute(2, 0, 1)


def base_colour(loaded: object) -> torch.Tensor | None:
    """The (3, H, W) texture a trimesh mesh's material shows (simple or PBR material), or None;
    ``mesh_file`` has folded a glTF Base Color factor into it, as glTF viewers and Blender show it."""
    material = getattr(getattr(loaded, "visual", None), "material", None)
    for name in ("image", "baseColorTexture"):
        image = getattr(material, name, None)
        if image is not None and not is_placeholder(image):
            return texture_tensor(image)  # a glTF factor is folded in as the file is read
    return None
