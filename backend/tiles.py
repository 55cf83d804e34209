"""UV maps laid out over several UV tiles (UDIM), textured as one image.

A UDIM map puts faces in unit squares side by side (tile 1001 is [0, 1]², 1002 the square to its
right, 1011 the one above), each read from its own image. Kiln makes one image, which Blender's
Image Texture node repeats over every square, so all tiles would share its texels: each face
would get a blend of every tile's faces there. Kiln therefore textures such a map with each tile
moved into a cell of the one image (``protocol.tile_cell``), and Blender adds that layout as a UV
map of its own (``protocol.TILES_UV_MAP``), leaving the artist's map as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .mesh import Mesh
from .protocol import tile_cell, udim_number
from .texture import SlotTextures

#: How far (in UV units) a face may stray over its tile's edge and still count as inside it.
_EDGE = 1e-3


@dataclass
class TileLayout:
    tiles: np.ndarray         # (N, 2) int: the tiles' (u, v), in UDIM order
    triangle_tile: np.ndarray  # (T,) int: each triangle's index into ``tiles``

    def describe(self) -> str:
        """The tiles as an artist names them: UDIM numbers where they have them."""
        numbers = _udim(self.tiles)
        if numbers.all():
            return "UDIM tiles " + ", ".join(str(n) for n in numbers.tolist())
        return f"{len(self.tiles)} UV tiles"

    def pack(self, corner_uvs: np.ndarray) -> np.ndarray:
        """(T, 3, 2) UVs with each triangle moved from its tile into the tile's cell."""
        cells = np.array([tile_cell(i, len(self.tiles)) for i in range(len(self.tiles))], np.float64)
        scale, offset = cells[self.triangle_tile, :1, None], cells[self.triangle_tile, None, 1:]
        origin = self.tiles[self.triangle_tile][:, None].astype(np.float64)
        return ((corner_uvs.astype(np.float64) - origin) * scale + offset).astype(np.float32)


def udim_numbers(corner_uvs: np.ndarray) -> np.ndarray:
    """(T,) each triangle's UDIM tile number, that of the square its centre lies in (0 outside
    UDIM's ten columns)."""
    return _udim(_face_tiles(corner_uvs))


def _face_tiles(corner_uvs: np.ndarray) -> np.ndarray:
    """(T, 2) the unit square of UV space each triangle's centre lies in."""
    return np.floor(corner_uvs.astype(np.float64).mean(axis=1)).astype(np.int64)


def _udim(tiles: np.ndarray) -> np.ndarray:
    """(N,) UDIM numbers of (N, 2) squares: 1001 + u + 10 v, or 0 outside UDIM's ten columns."""
    return udim_number(tiles[:, 0], tiles[:, 1])


def tile_layout(corner_uvs: np.ndarray) -> TileLayout | None:
    """The map's tiles, when its faces lie in more than one unit square of UV space and each face
    within one square; None otherwise. A map whose faces cross squares' edges (a floor whose UVs
    run 0 to 4 to repeat the image) is meant to repeat, and is textured as Blender repeats it."""
    uvs = corner_uvs.astype(np.float64)
    tile = _face_tiles(corner_uvs)
    inside = ((uvs >= tile[:, None] - _EDGE) & (uvs <= tile[:, None] + 1 + _EDGE)).all(axis=(1, 2))
    if (tile == tile[0]).all() or not inside.all():  # most maps: decided before sorting the tiles
        return None
    tiles, triangle_tile = np.unique(tile[:, ::-1], axis=0, return_inverse=True)  # sorted by v, then u
    return TileLayout(np.ascontiguousarray(tiles[:, ::-1]), triangle_tile.reshape(-1))


def pack_tiles(mesh: Mesh, texture: torch.Tensor | SlotTextures | None,
               ) -> tuple[TileLayout | None, torch.Tensor | SlotTextures | None]:
    """Move a mesh whose map spans several UV tiles onto one cell per tile (its ``corner_uvs``
    change), and the texture it shows, read through its old UVs, onto them, to compose when the
    job runs: each face still shows what its own tile showed. Returns the layout (None, and
    nothing changed, for a map within one tile) and the texture."""
    layout = tile_layout(mesh.corner_uvs)
    if layout is None:
        return None, texture
    original = torch.as_tensor(mesh.corner_uvs)
    mesh.corner_uvs = layout.pack(mesh.corner_uvs)
    packed = torch.as_tensor(mesh.corner_uvs)
    if isinstance(texture, torch.Tensor):
        texture = SlotTextures(texture, packed, torch.zeros(len(packed), dtype=torch.long), [(texture, original)])
    elif isinstance(texture, SlotTextures):
        sources = [(texture.base, original) if s is None and texture.base is not None else s for s in texture.sources]
        texture = replace(texture, corner_uvs=packed, sources=sources)
    return layout, texture
