"""Reading meshes out of the scene and writing UVs, images and materials back. Main thread only.

Bulk data goes through ``foreach_get``/``foreach_set`` with numpy (bundled with Blender): a
per-element Python loop over a 2048² image takes seconds, this takes milliseconds.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bpy
import numpy as np

from . import texture_file
from .backend import protocol
from .materials import (
    BaseColour,
    base_colour_sockets,
    existing_texture,
    flat_colour,
    is_udim,
    slot_sources,
    srgb_bytes_to_linear,
    uses_nodes,
)

class SceneError(Exception):
    """Bad scene input; the message names the problem and the fix. Where Kiln can make that fix
    itself, ``fix`` names it (a key of ``fixes.FIXES``) and ``obj`` the object's full name, and the
    panel offers it as a button."""

    def __init__(self, message: str, fix: str = "", obj: Any = None) -> None:
        super().__init__(message)
        self.fix, self.obj = fix, obj.name_full if obj is not None else ""


#: Object types whose surface Object > Convert > Mesh turns into faces; the advice to convert a
#: light, camera or armature led nowhere.
CONVERTIBLE = {"CURVE", "SURFACE", "META", "FONT"}


def check_object(obj: Any) -> None:
    if obj is None:
        raise SceneError("no object given: select one or more mesh objects")
    if obj.type == "EMPTY" and obj.instance_collection is not None:
        raise SceneError(f"{obj.name!r} is an instance of the collection {obj.instance_collection.name!r}, not a mesh: "
                         "texture the collection's meshes in its own scene, or make the instance real "
                         "(Object > Apply > Make Instances Real)")
    if obj.type != "MESH":
        kind = obj.type.lower().replace("_", " ")
        fix = "convert it (Object > Convert > Mesh) or deselect it" if obj.type in CONVERTIBLE \
            else "it has no surface to texture: deselect it"
        raise SceneError(f"{obj.name!r} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a mesh: {fix}")
    if obj.mode != "OBJECT":
        raise SceneError(f"{obj.name!r} is in {obj.mode.title()} Mode: switch to Object Mode first", "object_mode", obj)


def check_paintable(obj: Any) -> None:
    """A texturing target gets a material and maybe a UV map, which linked data cannot take (a
    reference object is only read, so it may be linked)."""
    check_object(obj)
    linked = obj.library or obj.data.library
    if linked is not None:
        raise SceneError(f"{obj.name!r} is linked from {linked.filepath}, so its materials and UV maps cannot "
                         "change here: make it local (Object > Relations > Make Local) or texture it in that file",
                         "make_local", obj)


def _modifiers(obj: Any) -> list[str]:
    return [m.name for m in obj.modifiers if m.show_viewport]


def _check_surface(obj: Any, mesh: Any) -> None:
    """Faces and triangles as the modifiers leave them: that is the surface Kiln textures."""
    after = " after its modifiers" if _modifiers(obj) else ""
    if len(mesh.polygons) == 0:
        raise SceneError(f"{obj.name!r} has no faces{after}: Kiln textures surfaces. Add faces or deselect it")
    tris = len(mesh.loop_triangles)
    if tris > protocol.MAX_TRIANGLES:
        raise SceneError(f"{obj.name!r} has {tris:,} triangles{after}, over Kiln's limit of "
                         f"{protocol.MAX_TRIANGLES:,}: reduce it first (lower its modifiers' levels, or add a "
                         "Decimate modifier)", "decimate", obj)


def _same_corners(a: Any, b: Any) -> bool:
    """Whether two meshes have the same face corners on the same vertices: then the modifiers
    between them only moved vertices, and per-corner data of one fits the other."""
    if len(a.loops) != len(b.loops):
        return False
    ia, ib = np.empty(len(a.loops), np.int32), np.empty(len(b.loops), np.int32)
    a.loops.foreach_get("vertex_index", ia)
    b.loops.foreach_get("vertex_index", ib)
    return bool(np.array_equal(ia, ib))


def mesh_arrays(obj: Any, uv_map: str | None = None,
                sources: list[BaseColour | list[float] | None] | None = None, base: str = "init_texture",
                selected_faces: bool = False, unwrap: bool = False) -> tuple[dict[str, Any], dict[str, protocol.Array]]:
    """The SUBMIT fields and arrays for one object as the viewport shows it (its modifiers applied,
    as a Mirror's missing half or a Subdivision's rounding change what the texture must fit):
    world-space positions, loop triangles, their loops, and the per-loop UVs of ``uv_map``
    (default: the active UV map) if it has one. The texture reaches the shown surface through the
    UV map, which modifiers carry by name. ``sources`` (``slot_sources``) adds what each material
    slot shows, so a refine job (or a reference object) shows every face's own look, the first
    image as ``base`` (the protocol module describes these arrays, beside REFERENCE_PREFIX).
    ``selected_faces`` adds which triangles lie in faces selected in Edit Mode, the ones to repaint.
    ``unwrap`` sends no UVs, so that the backend makes new ones (``outdated_unwrap``)."""
    check_object(obj)
    obj.data.update_tag()  # edits from scripts (a UV map removed) need not tag it, and would be missed
    evaluated = obj.evaluated_get(bpy.context.evaluated_depsgraph_get())
    mesh = evaluated.to_mesh()
    try:
        fields, arrays = _mesh_arrays(obj, mesh, uv_map, unwrap)
        if sources is not None:
            _slot_arrays(obj, mesh, sources, base, fields, arrays)
        if selected_faces:
            paint = _selected_triangles(obj, mesh)
            arrays[protocol.PAINT_TRIANGLES] = protocol.array("|u1", paint.shape, paint)
        return fields, arrays
    finally:
        evaluated.to_mesh_clear()


def _selected_triangles(obj: Any, mesh: Any) -> np.ndarray:
    """(T,) uint8, 1 for each of the shown mesh's triangles in a face selected in Edit Mode (the
    selection survives in Object Mode; Subdivision and Mirror carry it to their faces)."""
    chosen = np.empty(len(obj.data.polygons), bool)
    obj.data.polygons.foreach_get("select", chosen)
    if not chosen.any():
        raise SceneError(f"no faces of {obj.name!r} are selected: select the faces to repaint in Edit Mode "
                         "(Face Select, then back to Object Mode), or untick Only Selected Faces")
    if ".select_poly" not in mesh.attributes:
        raise SceneError(f"{obj.name!r}'s modifiers ({', '.join(_modifiers(obj))}) drop its face selection, so "
                         "Kiln cannot tell which faces to repaint: apply them, or untick Only Selected Faces")
    faces = np.empty(len(mesh.polygons), bool)
    mesh.polygons.foreach_get("select", faces)
    polygon = np.empty(len(mesh.loop_triangles), np.int32)
    mesh.loop_triangles.foreach_get("polygon_index", polygon)
    paint = faces[polygon]
    if not paint.any():
        raise SceneError(f"{obj.name!r}'s modifiers ({', '.join(_modifiers(obj))}) leave none of its selected faces "
                         "to repaint: select faces they keep, or untick Only Selected Faces")
    return paint.astype(np.uint8)


def _slot_arrays(obj: Any, mesh: Any, sources: list[BaseColour | list[float] | None], base: str,
                 fields: dict[str, Any], arrays: dict[str, protocol.Array]) -> None:
    """Each slot's image with the UVs it is read through, or its colour, and each triangle's slot.
    Each image and UV map is sent once: the first slot's image is ``base``, which the caller sends,
    and the mesh's own map its "loop_uvs"."""
    slots = np.empty(len(mesh.loop_triangles), np.int32)
    mesh.loop_triangles.foreach_get("material_index", slots)
    names = {f"uv:{fields['uv_map']}": "loop_uvs"}
    first = next((source for source in sources if isinstance(source, BaseColour)), None)
    if first is not None:
        names[f"image:{first.key}"] = base
    wire: list[dict[str, Any] | None] = []
    for k, source in enumerate(sources):
        if not isinstance(source, BaseColour):
            wire.append(None if source is None else {"color": source})
            continue
        if source.uv_map not in mesh.uv_layers:
            raise SceneError(f"{obj.name!r} loses the UV map {source.uv_map!r} that its material's image "
                             f"{source.image.name!r} is read through in its modifiers: keep it in their output, or "
                             "apply them")
        if f"image:{source.key}" not in names:
            names[f"image:{source.key}"] = f"slot_texture_{k}"
            rgba = source.rgba8()
            arrays[f"slot_texture_{k}"] = protocol.array("|u1", rgba.shape, rgba)
        if f"uv:{source.uv_map}" not in names:
            names[f"uv:{source.uv_map}"] = f"slot_uvs_{k}"
            uv = np.empty(len(mesh.loops) * 2, "<f4")
            mesh.uv_layers[source.uv_map].data.foreach_get("uv", uv)
            arrays[f"slot_uvs_{k}"] = protocol.array("<f4", (len(mesh.loops), 2), uv)
        wire.append({"texture": names[f"image:{source.key}"], "uvs": names[f"uv:{source.uv_map}"]})
    material = slots.copy()  # tiles join as sources after the slots', so their indices stay
    tiles: dict[tuple[str, int], str | None] = {}  # each tile's array, sent once however many slots show it
    for k, source in enumerate(sources):
        if not (isinstance(source, BaseColour) and is_udim(source.image)):
            continue
        for number, inside in _tile_faces(mesh, source.image, source.uv_map, material == k):
            if (source.key, number) not in tiles:
                rgba = source.tile_rgba8(number)
                tiles[source.key, number] = None if rgba is None else f"slot_texture_{len(wire)}"
                if rgba is not None:
                    arrays[f"slot_texture_{len(wire)}"] = protocol.array("|u1", rgba.shape, rgba)
            if tiles[source.key, number] is not None:
                slots[inside] = len(wire)
                wire.append({"texture": tiles[source.key, number], "uvs": wire[k]["uvs"]})
    arrays["triangle_slots"] = protocol.array("<i4", slots.shape, slots.astype("<i4"))
    fields["slot_sources"] = wire


def _tile_faces(mesh: Any, image: Any, uv_map: str, chosen: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """A UDIM image's tiles past its first, each with the ``chosen`` triangles that lie in it: those
    start from that tile's image, read through the same UVs, which the backend wraps into the unit
    square as they are within a tile."""
    uv = np.empty(len(mesh.loops) * 2, np.float32)
    mesh.uv_layers[uv_map].data.foreach_get("uv", uv)
    loops = np.empty(len(mesh.loop_triangles) * 3, np.int32)
    mesh.loop_triangles.foreach_get("loops", loops)
    tile = np.floor(uv.reshape(-1, 2)[loops].reshape(-1, 3, 2).mean(axis=1)).astype(np.int64)
    number = protocol.udim_number(tile[:, 0], tile[:, 1])
    masks = ((t.number, chosen & (number == t.number)) for t in image.tiles[1:])
    return [(n, inside) for n, inside in masks if inside.any()]


def _mesh_arrays(obj: Any, mesh: Any, uv_map: str | None,
                 unwrap: bool = False) -> tuple[dict[str, Any], dict[str, protocol.Array]]:
    _check_surface(obj, mesh)
    if uv_map and uv_map not in mesh.uv_layers:
        raise SceneError(f"{obj.name!r} loses its UV map {uv_map!r} in its modifiers ({', '.join(_modifiers(obj))}), "
                         "so its texture cannot follow them: keep the UV map in the modifiers' output, or apply them")
    uv_layer = None if unwrap else mesh.uv_layers[uv_map] if uv_map else mesh.uv_layers.active
    if uv_layer is None and not _same_corners(obj.data, mesh):
        raise SceneError(f"{obj.name!r} has no UV map, and its modifiers ({', '.join(_modifiers(obj))}) change its "
                         "faces, so the UVs Kiln would make could not be stored on the mesh: add a UV map (Edit Mode "
                         "> UV > Smart UV Project) or apply the modifiers, then retry", "add_uv_map", obj)
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)
    if not np.isfinite(co).all():
        bad = int((~np.isfinite(co)).any(axis=1).sum())
        raise SceneError(f"{obj.name!r} has {bad} vertices with NaN or infinite coordinates: fix or delete "
                         "them (Edit Mode > Mesh > Clean Up) before texturing")
    m = np.array(obj.matrix_world, np.float64)
    world = co @ m[:3, :3].T + m[:3, 3]
    # Only the shape and its orientation matter to a job: centred, float32 holds an object far from
    # the world's origin (a georeferenced scene) as finely as one at it.
    world = (world - (world.min(axis=0) + world.max(axis=0)) / 2).astype("<f4")  # faces exist: not empty
    tri_count = len(mesh.loop_triangles)
    tris, loops = world_corners(mesh, m)
    arrays = {
        "positions": protocol.array("<f4", world.shape, world),
        "triangles": protocol.array("<i4", (tri_count, 3), tris.astype("<i4")),
        "tri_loops": protocol.array("<i4", (tri_count, 3), loops.astype("<i4")),
    }
    if uv_layer is not None:
        uv = np.empty(len(mesh.loops) * 2, "<f4")
        uv_layer.data.foreach_get("uv", uv)
        arrays["loop_uvs"] = protocol.array("<f4", (len(mesh.loops), 2), uv)
    fields = {"object": obj.name, "loop_count": len(mesh.loops), "up_axis": "z",
              "uv_map": uv_layer.name if uv_layer is not None else protocol.UNWRAP_UV_MAP}
    return fields, arrays


def world_corners(mesh: Any, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each triangle's vertices and loops (T, 3), in the order that winds it, in world space, as
    Blender shows it. A mirrored object (negative scale) has its corners wound the other way round
    there, and Blender draws its faces' fronts flipped back; so do exporters, and so must Kiln,
    which reads a face's front from its winding (the side of an open mesh it views)."""
    count = len(mesh.loop_triangles)
    tris, loops = np.empty(count * 3, np.int32), np.empty(count * 3, np.int32)
    mesh.loop_triangles.foreach_get("vertices", tris)
    mesh.loop_triangles.foreach_get("loops", loops)
    tris, loops = tris.reshape(-1, 3), loops.reshape(-1, 3)
    if np.linalg.det(np.asarray(matrix, np.float64)[:3, :3]) < 0:
        tris, loops = tris[:, ::-1], loops[:, ::-1]
    return np.ascontiguousarray(tris), np.ascontiguousarray(loops)


def reference_arrays(obj: Any, baked: tuple[np.ndarray, str] | None = None
                     ) -> tuple[dict[str, Any], dict[str, protocol.Array]]:
    """The artist's reference object as SUBMIT fields and arrays (``protocol.REFERENCE_PREFIX``):
    its mesh, and ``baked`` (the colours it shows and their UV map, ``bake.bake_base_colour``) or
    its Base Color image read through that image's own UV map, else its flat colour."""
    found = existing_texture(obj) if obj is not None and obj.type == "MESH" and baked is None else None
    sources = slot_sources(obj) if obj is not None and obj.type == "MESH" and baked is None else None
    uv_map = baked[1] if baked else found.uv_map if found else None
    fields, arrays = mesh_arrays(obj, uv_map, sources, base="texture")
    if baked or found:
        rgba = baked[0] if baked else found.rgba8()
        arrays["texture"] = protocol.array("|u1", rgba.shape, rgba)
    elif (colour := flat_colour(obj)) is not None:
        fields["color"] = colour
    p = protocol.REFERENCE_PREFIX
    return ({p + k: v for k, v in fields.items() if k != "uv_map"}, {p + k: v for k, v in arrays.items()})


def add_uv_map(obj: Any, loop_uvs: np.ndarray) -> str:
    """The UV map from the backend's unwrap, ``protocol.UNWRAP_UV_MAP`` (made anew over an outdated
    one of Kiln's); the artist's own maps are left untouched."""
    mesh = obj.data
    _check_not_editing(obj)
    if loop_uvs.shape[0] != len(mesh.loops):
        raise SceneError(f"{obj.name!r} was edited while Kiln worked ({len(mesh.loops)} face corners now, "
                         f"{loop_uvs.shape[0]} when the job started): run it again")
    return _write_unwrap(obj, loop_uvs)


def _write_unwrap(obj: Any, loop_uvs: np.ndarray) -> str:
    """``protocol.UNWRAP_UV_MAP`` holding ``loop_uvs`` (over the old one), with the checksum of the
    faces it fits, which ``outdated_unwrap`` compares."""
    name = _write_uv_map(obj, protocol.UNWRAP_UV_MAP, loop_uvs, rewrite=True)
    obj.data[UNWRAPPED_FACES] = _faces_checksum(obj.data)
    return name


#: On a mesh Kiln unwrapped: a checksum of its faces then, so that a later job can tell whether the
#: artist has added or changed faces since, which the map does not fit.
UNWRAPPED_FACES = "kiln_unwrapped_faces"


def _faces_checksum(mesh: Any) -> str:
    """Which vertices each face's corners use, as a checksum (hex: an IDProperty int holds 32 bits, signed)."""
    corners, sizes = np.empty(len(mesh.loops), np.int32), np.empty(len(mesh.polygons), np.int32)
    mesh.loops.foreach_get("vertex_index", corners)
    mesh.polygons.foreach_get("loop_total", sizes)
    return f"{zlib.crc32(sizes.tobytes(), zlib.crc32(corners.tobytes())):08x}"


def outdated_unwrap(obj: Any) -> bool:
    """Whether the active UV map is one Kiln made for faces the mesh no longer has: a fresh job then
    unwraps it again (an extruded face's interpolated UVs would stretch one texel over it). A map
    the artist has only moved keeps its place; a refine job reads the old texture through it."""
    mesh, layer = obj.data, obj.data.uv_layers.active
    recorded = mesh.get(UNWRAPPED_FACES)
    return layer is not None and layer.name == protocol.UNWRAP_UV_MAP and recorded is not None \
        and recorded != _faces_checksum(mesh)


def add_tile_uv_map(obj: Any, source: str, tiles: list[list[int]]) -> str:
    """The UV map that reads a texture made for a map over several UV tiles (UDIM): a copy of
    ``source`` with each face moved from its tile into that tile's cell (``protocol.tile_cell``).
    Worked out on the object's own faces, so modifiers carry it as they carry ``source``; a job
    run again rewrites the map rather than adding another."""
    mesh = obj.data
    _check_not_editing(obj)
    if source not in mesh.uv_layers:
        raise SceneError(f"{obj.name!r} lost its UV map {source!r} while Kiln worked: run the job again")
    uv = np.empty(len(mesh.loops) * 2, np.float32)
    mesh.uv_layers[source].data.foreach_get("uv", uv)
    uv = uv.reshape(-1, 2).astype(np.float64)
    starts, counts = (np.empty(len(mesh.polygons), np.int32) for _ in range(2))
    mesh.polygons.foreach_get("loop_start", starts)
    mesh.polygons.foreach_get("loop_total", counts)
    face_of_loop = np.zeros(len(mesh.loops), np.int64)
    loops = np.repeat(starts, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    face_of_loop[loops] = np.repeat(np.arange(len(starts)), counts)
    centre = np.stack([np.bincount(face_of_loop, uv[:, axis], len(starts)) for axis in (0, 1)], 1)
    tile = np.floor(centre / np.maximum(counts, 1)[:, None]).astype(np.int64)[face_of_loop]
    index = np.zeros(len(tile), np.int64)  # a face in none of them (hidden by a modifier): the first cell
    for i, known in enumerate(tiles):
        index[(tile == known).all(axis=1)] = i
    cells = np.array([protocol.tile_cell(i, len(tiles)) for i in range(len(tiles))])[index]
    return _write_uv_map(obj, protocol.TILES_UV_MAP, (uv - tile) * cells[:, :1] + cells[:, 1:], rewrite=True)


def _check_not_editing(obj: Any) -> None:
    if obj.mode == "EDIT":  # leaving Edit Mode writes the edit mesh back, without a map added meanwhile
        raise SceneError(f"{obj.name!r} went into Edit Mode before Kiln could add its UV map: leave Edit Mode "
                         "and run the job again")


def _write_uv_map(obj: Any, name: str, loop_uvs: np.ndarray, rewrite: bool = False) -> str:
    """A new UV map ``name`` holding ``loop_uvs``; with ``rewrite``, the map of that name if there is one."""
    mesh = obj.data
    layer = (mesh.uv_layers.get(name) if rewrite else None) or mesh.uv_layers.new(name=name)
    if layer is None:
        raise SceneError(f"{obj.name!r} already has 8 UV maps, Blender's limit: delete one and retry")
    layer.data.foreach_set("uv", np.ascontiguousarray(loop_uvs, np.float32).ravel())
    mesh.update()
    return layer.name


@dataclass
class LiveTexture:
    """The image one job paints into; the float buffer is reused across updates
    (a fresh 64 MiB allocation per update costs more than the copy itself). ``frame`` is the
    last update's pixels, which the PNG is made from once the job ends."""

    obj_name: str
    image: Any
    buffer: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, np.float32))
    frame: np.ndarray | None = field(repr=False, default=None)

    def update(self, rgba: protocol.Array) -> None:
        h, w, _ = rgba.shape
        if tuple(self.image.size) != (w, h):
            self.image.scale(w, h)
        if self.buffer.size != w * h * 4:
            self.buffer = np.empty(w * h * 4, np.float32)
        self.frame = np.frombuffer(rgba.data, np.uint8).reshape(h, w, 4)
        np.multiply(self.frame.reshape(-1), np.float32(1 / 255), out=self.buffer)
        self.image.pixels.foreach_set(self.buffer)
        self.image.update()


#: The nodes Kiln adds to a material: found and replaced when a later job textures it again.
TEXTURE_NODE, UV_NODE = "Kiln Texture", "Kiln UV"
#: The object property holding the materials it had before Kiln's first job since they were set,
#: what Restore Materials puts back: {"slots": count, "0": material, ...}, empty slots left out. It
#: points at the materials themselves, so renaming one does not lose it.
PREVIOUS_MATERIALS = "kiln_previous_materials"


def _made_by_kiln(material: Any) -> bool:
    return uses_nodes(material) and TEXTURE_NODE in material.node_tree.nodes


def recorded_materials(obj: Any) -> list[Any] | None:
    """The materials ``PREVIOUS_MATERIALS`` holds, slot by slot (None for an empty one), or None."""
    record = obj.get(PREVIOUS_MATERIALS)
    return None if record is None else [record.get(str(i)) for i in range(record["slots"])]


def restore_materials(obj: Any) -> bool:
    """Put back the materials ``PREVIOUS_MATERIALS`` holds, dropping the slots Kiln added; False
    when there is no record."""
    materials = recorded_materials(obj)
    if materials is None:
        return False
    while len(obj.material_slots) > len(materials):  # the slot a job added to a mesh that had none
        obj.active_material_index = len(obj.material_slots) - 1
        with bpy.context.temp_override(object=obj):
            bpy.ops.object.material_slot_remove()
    for slot, material in zip(obj.material_slots, materials):
        slot.material = material
    del obj[PREVIOUS_MATERIALS]
    return True


def start_live_texture(obj: Any, uv_map: str, size: tuple[int, int], record: bool = True) -> LiveTexture:
    """Create the image and put on every slot a material that shows it as Base Color through
    ``uv_map``. A slot whose material has a Principled BSDF gets a copy of it with only Base Color
    rewired, so the rest of the artist's shading (roughness, normal and bump maps, per-slot
    metals) shows with the new colours; others get a plain Principled BSDF. Replaced materials get
    a fake user so saving never drops them, and with ``record`` are named in ``PREVIOUS_MATERIALS``
    for Restore Materials."""
    image = bpy.data.images.new(f"Kiln {obj.name}", size[0], size[1], alpha=True)
    _keep_previous(obj, record)

    def kept(material: Any) -> Any:  # the artist's material whose copy shows the image, None for a plain one
        return material if material is not None and base_colour_sockets(material) else None
    sources = list(dict.fromkeys(kept(slot.material) for slot in obj.material_slots)) or [None]
    made = {source: _show_image(source.copy() if source else _plain_material(),
                                f"Kiln {obj.name}" if len(sources) == 1 or not source else
                                f"Kiln {obj.name} ({source.name})", image, uv_map) for source in sources}
    if obj.material_slots:
        for slot in obj.material_slots:
            slot.material = made[kept(slot.material)]
    else:
        obj.data.materials.append(made[None])
    return LiveTexture(obj.name, image)


def _keep_previous(obj: Any, record: bool = True) -> None:
    """Before a job replaces ``obj``'s materials: a fake user on each, so saving never drops them,
    and (with ``record``) the record Restore Materials reads, unless it holds the artist's
    materials already and these are Kiln's."""
    previous = list(dict.fromkeys(slot.material for slot in obj.material_slots if slot.material))
    for material in previous:
        material.use_fake_user = True
    if record and (PREVIOUS_MATERIALS not in obj or not all(_made_by_kiln(m) for m in previous)):
        obj[PREVIOUS_MATERIALS] = {"slots": len(obj.material_slots),
                                   **{str(i): s.material for i, s in enumerate(obj.material_slots) if s.material}}


def share_texture(obj: Any, textured: Any) -> None:
    """Show on ``obj`` what a job put on ``textured``, whose mesh it shares (a linked duplicate).
    Slots linked to the mesh already show it; slots linked to the object hold materials of its
    own, which the job did not reach: they take ``textured``'s."""
    own = [i for i, slot in enumerate(obj.material_slots) if slot.link == "OBJECT"]
    if not own:
        return
    _keep_previous(obj)
    for i in own:
        obj.material_slots[i].material = textured.material_slots[i].material


def _plain_material() -> Any:
    material = bpy.data.materials.new("Kiln")
    if not material.node_tree:  # Blender < 5 creates node trees only on request
        material.use_nodes = True
    tree = material.node_tree
    if not base_colour_sockets(material):  # Blender makes new materials with one; never left without
        output = tree.get_output_node("ALL") or tree.nodes.new("ShaderNodeOutputMaterial")
        tree.links.new(tree.nodes.new("ShaderNodeBsdfPrincipled").outputs["BSDF"], output.inputs["Surface"])
    return material


def _show_image(material: Any, name: str, image: Any, uv_map: str) -> Any:
    """``material`` (its own copy) with ``image``, read through ``uv_map``, on each Principled
    BSDF's Base Color; the nodes an earlier job added are replaced, not piled up."""
    material.name = name
    nodes, links = material.node_tree.nodes, material.node_tree.links
    for old in (TEXTURE_NODE, UV_NODE):
        if old in nodes:
            nodes.remove(nodes[old])
    sockets = base_colour_sockets(material)
    tex = nodes.new("ShaderNodeTexImage")
    tex.name = tex.label = TEXTURE_NODE
    tex.image = image
    tex.extension = "REPEAT"  # as the backend samples UVs outside the unit square (texture.wrap_uvs)
    tex.location = (sockets[0].node.location.x - 350, sockets[0].node.location.y)
    uv = nodes.new("ShaderNodeUVMap")
    uv.name = uv.label = UV_NODE
    uv.uv_map = uv_map
    uv.location = (tex.location.x - 250, tex.location.y)
    links.new(uv.outputs["UV"], tex.inputs["Vector"])
    for socket in sockets:
        links.new(tex.outputs["Color"], socket)
    nodes.active = tex  # what Solid shading's Texture colour shows, and what Texture Paint paints on
    return material


def save_texture(live: LiveTexture, seed: int) -> texture_file.TextureFile | None:
    """Start making the image's PNG, to write next to the .blend (``//kiln_textures/``) or to pack
    into an unsaved file; ``saved_texture`` finishes on the main thread once it is done. None
    when no frame ever arrived. The job is over, so its pixel buffers go (320 MB at 4096²):
    the finished session stays referenced until the next job."""
    frame, live.frame, live.buffer = live.frame, None, np.empty(0, np.float32)
    if frame is None:
        return None
    folder = Path(bpy.path.abspath("//kiln_textures")) if bpy.data.filepath else None
    # Blender 5 names run to 254 bytes, file names to 255 with the seed and counter after them.
    stem = re.sub(r"[^\w.-]+", "_", live.obj_name).encode()[:120].decode(errors="ignore")
    return texture_file.TextureFile(frame, folder, f"{stem}_seed{seed}")


def saved_texture(live: LiveTexture, made: texture_file.TextureFile) -> str:
    """Point the image at the PNG ``made`` wrote, or pack it into the .blend (an unsaved file, or
    a folder that cannot be written), so that saving the .blend never drops the result; where it
    went, for the job's summary. Blender reads the pixels back from it: the same bytes. Raises
    ReferenceError when the image was undone or deleted meanwhile."""
    image = live.image
    if image.packed_file is not None:  # packed as it stood when the .blend was saved mid-job
        image.unpack(method="REMOVE")
    if made.path is not None:
        image.filepath_raw = str(made.path)
        image.source = "FILE"
        image.filepath = bpy.path.relpath(str(made.path))
        return str(made.path)
    image.pack(data=made.data, data_len=len(made.data))
    image.source = "FILE"
    if made.error is None:
        return "packed into the .blend (save the file to write it to disk)"
    return (f"packed into the .blend, as {made.folder} cannot be written ({made.error}); to have it as a file, "
            "save it from the Image Editor (Image > Save As)")


# --- generated objects ---------------------------------------------------------------------

#: A unit tetrahedron; each preview point becomes one, scaled by its Gaussian's size.
_TETRA = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], np.float32) / np.sqrt(3)
_TETRA_FACES = np.array([[0, 1, 2], [0, 3, 1], [0, 2, 3], [1, 3, 2]], np.int32)


def _set_geometry(mesh: Any, positions: np.ndarray, triangles: np.ndarray) -> None:
    """Replace a mesh's geometry with triangles, in bulk (``foreach_set``, no per-element Python)."""
    mesh.clear_geometry()
    mesh.vertices.add(len(positions))
    mesh.loops.add(triangles.size)
    mesh.polygons.add(len(triangles))
    mesh.vertices.foreach_set("co", np.ascontiguousarray(positions, np.float32).ravel())
    mesh.loops.foreach_set("vertex_index", np.ascontiguousarray(triangles, np.int32).ravel())
    mesh.polygons.foreach_set("loop_start", np.arange(0, triangles.size, 3, dtype=np.int32))
    mesh.polygons.foreach_set("loop_total", np.full(len(triangles), 3, np.int32))
    mesh.update()


#: Marks a point preview's object, so that one a file kept (an autosave) goes when the file is opened.
PREVIEW_TAG = "kiln_preview"


@dataclass
class PointPreview:
    """The live stand-in of an object being generated: a small tetrahedron per Gaussian, coloured
    through a colour attribute, at the 3D cursor. Removed when the real object arrives, which
    takes its place: an artist who moved, turned or scaled the preview has the object there. It
    keeps its last points and its place, so that it can leave the scene for a save and come back."""

    name: str
    location: Any
    obj: Any = None
    points: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    placement: Any = None  # its transform (a Matrix) while it is out of the scene

    def update(self, positions: np.ndarray, colors: np.ndarray, sizes: np.ndarray) -> None:
        self.points = (positions, colors, sizes)
        if self.obj is None:
            self.obj = _preview_object(self.name, self.location)
            if self.placement is not None:
                self.obj.matrix_basis = self.placement
        n = len(positions)
        radius = np.clip(sizes, 0.004, 0.05)[:, None, None]
        verts = (positions[:, None, :] + _TETRA[None] * radius).reshape(-1, 3)
        tris = (_TETRA_FACES[None] + 4 * np.arange(n, dtype=np.int32)[:, None, None]).reshape(-1, 3)
        mesh = self.obj.data
        _set_geometry(mesh, verts, tris)
        attr = mesh.color_attributes.get("Col") or mesh.color_attributes.new("Col", "FLOAT_COLOR", "POINT")
        rgba = np.ones((n, 4, 4), np.float32)
        rgba[..., :3] = srgb_bytes_to_linear(colors.astype(np.uint8))[:, None, :]
        attr.data.foreach_set("color", rgba.ravel())

    def transform(self) -> Any:
        """Where it stands (a Matrix), as the artist may have moved it; None before its first frame.
        Raises ReferenceError when the artist deleted it."""
        return self.obj.matrix_basis.copy() if self.obj is not None else self.placement

    def remove(self) -> None:
        """Out of the scene and the file; ``restore`` brings it back from its points."""
        if self.obj is not None:
            self.placement = self.transform()
            _remove_with_its_data(self.obj)
            self.obj = None

    def restore(self) -> None:
        if self.obj is None and self.points is not None:
            self.update(*self.points)


def _remove_with_its_data(obj: Any) -> None:
    mesh = obj.data
    materials = [m for m in mesh.materials if m is not None]
    bpy.data.objects.remove(obj)
    bpy.data.meshes.remove(mesh)
    for material in materials:
        bpy.data.materials.remove(material)


def remove_stale_previews() -> list[str]:
    """The point previews a file was saved with (Blender's autosave runs no save handlers): their
    job is gone, so they go too. Their names, for a note."""
    stale = [obj for obj in bpy.data.objects if obj.get(PREVIEW_TAG) and not obj.library]
    names = [obj.name for obj in stale]
    for obj in stale:
        _remove_with_its_data(obj)
    return names


def _link_new(obj: Any) -> None:
    """Into the active collection, as Blender's Add menu does, so a generated object lands where the
    artist is organising; the scene's own collection when that one would hide it or cannot take it
    (excluded or hidden in the view layer, linked from another file)."""
    layer = bpy.context.view_layer.active_layer_collection
    usable = not (layer.exclude or layer.hide_viewport or layer.collection.hide_viewport
                  or layer.collection.library or layer.collection.override_library)
    (layer.collection if usable else bpy.context.scene.collection).objects.link(obj)


def _preview_object(name: str, location: Any) -> Any:
    mesh = bpy.data.meshes.new(f"{name} preview")
    obj = bpy.data.objects.new(f"{name} preview", mesh)
    obj[PREVIEW_TAG] = True
    obj.location = location
    _link_new(obj)
    material = bpy.data.materials.new(f"{name} preview")
    if not material.node_tree:
        material.use_nodes = True
    nodes = material.node_tree.nodes
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None) or nodes.new("ShaderNodeBsdfPrincipled")
    attribute = nodes.new("ShaderNodeAttribute")
    attribute.attribute_name = "Col"
    material.node_tree.links.new(attribute.outputs["Color"], bsdf.inputs["Base Color"])
    mesh.materials.append(material)
    return obj


def build_object(name: str, positions: np.ndarray, triangles: np.ndarray, corner_uvs: np.ndarray,
                 location: Any) -> Any:
    """A new mesh object at ``location`` with a ``KilnUV`` map, smooth shaded, linked to the scene
    and selected; its texture material comes with the job's textures (``start_live_texture``)."""
    mesh = bpy.data.meshes.new(name)
    _set_geometry(mesh, positions, triangles)
    mesh.shade_smooth()
    obj = bpy.data.objects.new(name, mesh)
    _write_unwrap(obj, corner_uvs)  # with its faces' checksum: edited later, a fresh job unwraps it again
    obj.location = location
    _link_new(obj)
    for other in bpy.context.selected_objects:
        other.select_set(False)
    obj.select_set(True)
    bpy.context.view_layer.objects.active = obj
    return obj


class ReferenceIcon:
    """Asset thumbnails as icons for the panel (the reference a job uses, a search's hits), keyed by
    file. They live in a preview collection, outside the .blend: shown, never saved, nothing to undo."""

    _previews: Any = None

    @classmethod
    def show(cls, key: str, thumbnail: np.ndarray) -> int:
        """(S, S, 3) uint8, top row first → the icon id (0 in background mode, where nothing draws)."""
        if bpy.app.background:
            return 0
        from bpy.utils import previews

        if cls._previews is None:
            cls._previews = previews.new()
        preview = cls._previews.get(key) or cls._previews.new(key)
        h, w, _ = thumbnail.shape
        rgba = np.concatenate([thumbnail, np.full((h, w, 1), 255, np.uint8)], 2)[::-1]  # Blender: bottom row first
        preview.image_size = (w, h)
        preview.image_pixels_float.foreach_set((rgba.astype(np.float32) / 255).ravel())
        return preview.icon_id

    @classmethod
    def get(cls, key: str) -> int:
        """The icon shown for ``key`` this session, else 0 (icons are not saved with the file)."""
        preview = cls._previews.get(key) if cls._previews is not None else None
        return preview.icon_id if preview is not None else 0

    @classmethod
    def free(cls) -> None:
        if cls._previews is not None:
            from bpy.utils import previews

            previews.remove(cls._previews)
            cls._previews = None
