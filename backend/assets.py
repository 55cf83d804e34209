"""Reference assets: a textured mesh from the artist's library (or their selected object), placed in
the frame of the mesh being made and rendered from the method's cameras.

ReDream's warm-up compares the method's views with the asset's views from the same cameras, so the
asset must sit where the result will: same up axis, same bounding-box centre and diagonal (the
diagonal is what ``cameras.orbit`` frames by), turned about the up axis so its front faces the
front. Colour comes from the asset's base-colour image through its UVs, else from its vertex
colours, else from its material's flat colour.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote

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
    if getattr(visual, "kind", None) == "vertex":
        colours = np.asarray(visual.vertex_colors, np.float32)[:, :3] / 255
    else:
        colours = np.broadcast_to(flat_colour(getattr(visual, "material", None)), (len(mesh.positions), 3))
    return Asset(mesh, corner_colours=np.ascontiguousarray(colours[mesh.triangles]))


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


def _gltf_header(path: Path) -> dict | None:
    """A glTF file's JSON (a GLB's JSON chunk only: its binary one may run to hundreds of MB), or
    None for other files and for what is not glTF (trimesh has read it, or said why not)."""
    suffix = path.suffix.lower()
    if suffix not in (".glb", ".gltf"):
        return None
    with path.open("rb") as file:
        if suffix == ".gltf":
            data = file.read()
        else:
            head = file.read(20)
            if head[:4] != b"glTF" or head[16:20] != b"JSON":
                return None
            data = file.read(struct.unpack("<I", head[12:16])[0])
    try:
        header = json.loads(data)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def texture_placement_problem(path: Path) -> str | None:
    """Why the Base Color texture of a glTF file cannot be read as laid 1:1 on its first UV set,
    the only way trimesh reads it: a KHR_texture_transform (tiling, offset, rotation) or another
    UV set. None for other files, or when it is read right."""
    for material in (_gltf_header(path) or {}).get("materials", []):
        texture = material.get("pbrMetallicRoughness", {}).get("baseColorTexture")
        if texture is None:
            continue
        name = material.get("name", "a material")
        if "KHR_texture_transform" in texture.get("extensions", {}):
            return f"{name!r}'s Base Color texture is placed by KHR_texture_transform (tiled, offset or turned)"
        if texture.get("texCoord", 0) != 0:
            return f"{name!r}'s Base Color texture is read through UV set {texture['texCoord']}, not the first"
    return None


def missing_texture(path: Path) -> str | None:
    """The file holding an OBJ's or glTF's colour texture (or an OBJ's material library) that is
    not where the model names it, moved or left behind in a copy; None when none is missing.
    trimesh drops such a texture without a word, leaving the material's flat colour."""
    if path.suffix.lower() == ".obj":
        return _obj_missing_texture(path)
    header = _gltf_header(path) or {}
    textures, images = header.get("textures", []), header.get("images", [])
    for material in header.get("materials", []):
        index = material.get("pbrMetallicRoughness", {}).get("baseColorTexture", {}).get("index")
        source = textures[index].get("source") if isinstance(index, int) and index < len(textures) else None
        uri = images[source].get("uri", "") if isinstance(source, int) and source < len(images) else ""
        if uri and not uri.startswith("data:") and not (path.parent / unquote(uri)).is_file():
            name = repr(material["name"]) if material.get("name") else "its material"
            return f"{name} shows the texture {unquote(uri)!r}, which is not in {path.parent}"
    return None


def _obj_missing_texture(path: Path) -> str | None:
    """``missing_texture`` for an OBJ: its ``mtllib`` files, and the ``map_Kd`` each names."""
    with path.open("rb") as file:
        libraries = [line[6:].decode(errors="replace").strip() for line in file if line.startswith(b"mtllib")]
    for name in libraries:
        library = path.parent / name
        if not library.is_file():
            return f"its material library {name!r} is not in {path.parent}"
        material = "a material"
        for line in library.read_text(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["newmtl"]:
                material = " ".join(words[1:])
            elif words[:1] and words[0].lower() == "map_kd" and len(words) > 1:
                # options (-s 1 1 1, -bm 0.5...) come before the file name, which may hold spaces
                if not any((library.parent / " ".join(words[i:])).is_file() for i in range(1, len(words))):
                    return f"{material!r} in {name} shows the texture {words[-1]!r}, which is not in {library.parent}"
    return None


def base_colour(loaded: object) -> torch.Tensor | None:
    """The (3, H, W) texture a trimesh mesh's material shows (simple or PBR material), or None. A
    glTF material's Base Color factor tints its texture, as glTF viewers and Blender show it."""
    material = getattr(getattr(loaded, "visual", None), "material", None)
    for name in ("image", "baseColorTexture"):
        image = getattr(material, name, None)
        if image is not None and not is_placeholder(image):
            return texture_tensor(image)  # a glTF factor is folded in as the file is read
    return None
