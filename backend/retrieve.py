"""Which reference assets a job uses, ReDream-style: the artist's own object, the files the artist
ticked among a search's hits, or else the assets the prompt retrieves from the indexed libraries.

The first one is the job's primary reference (faced forward, the warm-up's target, the Gaussians'
start); all of them feed the prior's LoRA adaptation, each with its caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import protocol
from .assets import Asset, load_asset
from .jobs import JobRequest, mesh_from_message, slot_textures_from_message, texture_from_message
from .library import Hit, LibraryIndex, caption_for, search, thumbnails
from .mesh import MeshError
from .tiles import pack_tiles

if TYPE_CHECKING:
    from .embed import ClipEmbedder


@dataclass
class Chosen:
    asset: Asset              # in its own frame, as read
    caption: str
    label: str                # the file, or the artist's object by name
    score: float              # retrieval score; 1 for what the artist picked
    thumbnails: np.ndarray    # (V, S, S, 3) uint8


def load_indexes(request: JobRequest) -> list[LibraryIndex]:
    indexes = []
    for folder in request.libraries:
        index = LibraryIndex.load(Path(folder).expanduser().resolve())
        if index is None:
            raise MeshError(f"asset library {folder!r} has not been indexed: index it first (Index Libraries "
                            "in the panel, or `python -m backend index FOLDER`)")
        indexes.append(index)
    return indexes


def search_libraries(request: JobRequest, count: int, clip: "ClipEmbedder | None") -> list[Hit]:
    """The ``count`` assets nearest the prompt over the request's libraries, best first."""
    from .embed import WordLlamaEmbedder

    hits = search(load_indexes(request), request.prompt, count, WordLlamaEmbedder(), clip)
    if not hits:
        raise MeshError("the asset libraries are empty: add assets and index them again, or turn off "
                        "Use References")
    return hits


def choose(request: JobRequest, own: tuple[Asset, str] | None, count: int,
           clip: "ClipEmbedder | None") -> list[Chosen]:
    """The job's references, primary first: the artist's object (``own``: asset and name), else
    the request's files, else ``count`` hits of a library search; [] when it asks for none."""
    if own is not None:
        asset, name = own
        return [Chosen(asset, protocol.name_words(name), name, 1.0, thumbnails(asset))]
    if request.references:
        chosen = []
        for file in request.references:
            path = Path(file).expanduser()
            asset = load_asset(path)
            chosen.append(Chosen(asset, caption_for(path), str(path), 1.0, thumbnails(asset)))
        return chosen
    if request.libraries:
        return [Chosen(load_asset(hit.file), hit.entry.caption, str(hit.file), hit.score, hit.thumbnails)
                for hit in search_libraries(request, count, clip)]
    return []


def asset_from_message(msg: protocol.Message) -> tuple[Asset, str] | None:
    """The artist's reference object a SUBMIT carries (``protocol.REFERENCE_PREFIX`` arrays), with
    its name; None when it carries none. Without a texture it has its flat "reference_color", else
    grey, like an unpainted model."""
    p = protocol.REFERENCE_PREFIX
    if p + "positions" not in msg.arrays:
        return None
    name = str(msg.get("reference_object") or "reference")
    mesh = mesh_from_message(msg, p)
    mesh.validate()
    texture = texture_from_message(msg, p + "texture")
    if mesh.corner_uvs is None:
        texture = None
    slots = slot_textures_from_message(msg, mesh, p, texture)  # several materials, shown face by face
    if texture is not None:
        return Asset(mesh, texture=pack_tiles(mesh, slots or texture)[1]), name  # a UDIM map: a cell per tile
    colour = np.clip(np.asarray(msg.get(p + "color") or (0.6, 0.6, 0.6), np.float32).reshape(3), 0, 1)
    if slots is not None:
        return Asset(mesh, corner_colours=slots.corner_colours(colour)), name
    return Asset(mesh, corner_colours=np.broadcast_to(colour, (len(mesh.triangles), 3, 3)).copy()), name
