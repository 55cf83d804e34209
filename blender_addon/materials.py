"""What a material shows as Base Color, read without changing it: the image (maybe multiplied by
a colour, as glTF imports a factor) and the UV map it is read through, each slot's image or flat
colour, UDIM tiles, and what Kiln cannot read (for ``bake``). Main thread only.

Pixels come out as uint8 sRGB, rows bottom-up as Blender holds them, through ``foreach_get``
and in-place numpy: this runs on Blender's main thread as a job starts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bpy
import numpy as np

from .backend import protocol
from .backend.colour import linear_to_srgb, srgb_to_linear


def uses_nodes(material: Any) -> bool:
    """Before Blender 5, a material may keep a node tree it does not use (Use Nodes off): it then
    shows its Viewport Display colour, and its nodes mean nothing."""
    return material is not None and material.node_tree is not None and (bpy.app.version >= (5, 0) or material.use_nodes)


def output_node(material: Any) -> Any:
    """The Material Output that shows: the one for all engines, else the one for the scene's
    render engine, else the other engine's (an artist may keep a Cycles-only and an EEVEE-only
    output; ``get_output_node("ALL")`` finds neither)."""
    tree = material.node_tree
    first = "CYCLES" if bpy.context.scene.render.engine == "CYCLES" else "EEVEE"
    return next((node for target in ("ALL", first, {"CYCLES": "EEVEE", "EEVEE": "CYCLES"}[first])
                 if (node := tree.get_output_node(target)) is not None), None)


def base_colour_sockets(material: Any) -> list[Any]:
    """The sockets of the material's own nodes that become a Principled BSDF's Base Color on the
    way to its output: each such BSDF's Base Color, and the input of a node group (a studio's shared
    shader) that its Principled BSDF's Base Color is wired straight to. One left unconnected beside an
    Emission (an unlit look) shows nothing, so it is neither read nor painted."""
    if not uses_nodes(material):
        return []
    return _tree_base_colour_sockets(output_node(material), set())


def _tree_base_colour_sockets(output: Any, groups: set[str]) -> list[Any]:
    """``base_colour_sockets`` within one node tree, from its output node; ``groups`` holds the
    node groups being looked into, so a group that contains itself ends the search."""
    found, seen, todo = [], set(), [output] if output is not None else []
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.type == "BSDF_PRINCIPLED":
            found.append(node.inputs["Base Color"])
        elif node.type == "GROUP" and node.node_tree is not None and node.node_tree.name not in groups:
            inner_output = next((n for n in node.node_tree.nodes if n.type == "GROUP_OUTPUT" and n.is_active_output),
                                None)
            for inner in _tree_base_colour_sockets(inner_output, groups | {node.node_tree.name}):
                link = inner.links[0] if inner.links else None
                if link is not None and link.from_node.type == "GROUP_INPUT":  # else painted inside the group
                    socket = next(i for i in node.inputs if i.identifier == link.from_socket.identifier)
                    if socket.type == "RGBA":
                        found.append(socket)
        todo += [link.from_node for socket in node.inputs for link in socket.links]
    return found


#: Colour-mixing nodes by type, with their factor and two colour inputs (identifiers): glTF's
#: importer multiplies a Base Color texture by its factor with one, and older files have the other.
_MIX_INPUTS = {"ShaderNodeMix": ("Factor_Float", "A_Color", "B_Color"), "ShaderNodeMixRGB": ("Fac", "Color1", "Color2")}


def _reads_uvs(image_node: Any) -> bool:
    """Whether an Image Texture lays its image on the surface by a UV map as it is, the way Kiln
    reads it: flat projection, its vector unlinked, from a UV Map node or a Texture Coordinate's
    UV. A Mapping node (a tiled texture), box projection or generated coordinates place it
    otherwise, which only a bake reproduces."""
    if image_node.projection != "FLAT":
        return False
    links = image_node.inputs["Vector"].links
    if not links:
        return True
    source = links[0].from_node
    return source.type == "UVMAP" or (source.type == "TEX_COORD" and links[0].from_socket.identifier == "UV")


def _image_behind(socket: Any, placed_any_way: bool = False) -> tuple[Any, tuple[float, float, float]] | None:
    """The Image Texture node feeding a colour socket by a UV map (``_reads_uvs``; with
    ``placed_any_way``, however it is placed), and the constant colour (linear RGB) it is multiplied
    by on the way: (1, 1, 1) when linked straight in. None for anything else, whose colours Kiln
    cannot work out."""
    if not socket.links:
        return None
    node = socket.links[0].from_node
    if node.type == "TEX_IMAGE":
        return (node, (1.0, 1.0, 1.0)) if placed_any_way or _reads_uvs(node) else None
    names = _MIX_INPUTS.get(node.bl_idname)
    if names is None or node.blend_type != "MULTIPLY" or getattr(node, "data_type", "RGBA") != "RGBA":
        return None
    fac, a, b = (next(i for i in node.inputs if i.identifier == name) for name in names)
    if fac.links or abs(fac.default_value - 1.0) > 1e-6:
        return None
    for image, colour in ((a, b), (b, a)):
        if image.links and image.links[0].from_node.type == "TEX_IMAGE" and not colour.links:
            found = image.links[0].from_node
            tint = tuple(float(c) for c in colour.default_value[:3])
            return (found, tint) if placed_any_way or _reads_uvs(found) else None
    return None


def _base_colour_source(material: Any, placed_any_way: bool = False) -> tuple[Any, tuple[float, float, float]] | None:
    """The Image Texture node feeding a Principled BSDF's Base Color with a readable image (maybe
    through a Multiply by a colour; ``_image_behind``), and that colour; or None."""
    for socket in base_colour_sockets(material):
        found = _image_behind(socket, placed_any_way)
        if found is not None and found[0].image is not None and 0 not in tuple(found[0].image.size):
            return found  # else no image, or one whose file is missing
    return None


@dataclass(frozen=True)
class BaseColour:
    """A material's Base Color image, the UV map it is read through, and the colour (linear RGB)
    it is multiplied by on its way, as glTF imports a Base Color factor: a job starts from what
    the material shows, and its texture replaces that chain."""

    image: Any
    uv_map: str
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def key(self) -> str:
        """Equal for sources that send the same pixels."""
        return f"{self.image.name}|{self.tint}"

    def rgba8(self) -> np.ndarray:
        return self._tinted(image_rgba8(self.image))

    def tile_rgba8(self, number: int) -> np.ndarray | None:
        rgba = tile_rgba8(self.image, number)
        return None if rgba is None else self._tinted(rgba)

    def _tinted(self, rgba: np.ndarray) -> np.ndarray:
        if self.tint == (1.0, 1.0, 1.0):
            return rgba
        linear = srgb_bytes_to_linear(rgba[..., :3]) * np.asarray(self.tint, np.float32)
        out = rgba.copy()
        out[..., :3] = (_linear_to_srgb(linear) * 255 + 0.5).astype(np.uint8)
        return out


def base_colour_rgba8(material: Any) -> np.ndarray | None:
    """The pixels a material's Base Color image shows (``BaseColour``), or None. However the image
    is placed: a .blend asset exported as a reference shows its texture, if not its tiling."""
    found = _base_colour_source(material, placed_any_way=True)
    return None if found is None else BaseColour(found[0].image, "", found[1]).rgba8()


def existing_texture(obj: Any) -> BaseColour | None:
    """The Base Color image of the object's first material that has one, with the UV map it is
    read through."""
    for slot in obj.material_slots:
        found = _material_image(obj, slot.material)
        if found is not None:
            return found
    return None


def _material_image(obj: Any, material: Any) -> BaseColour | None:
    """A material's Base Color image and the UV map it is read through, if the mesh has that map."""
    found = _base_colour_source(material)
    if found is None:
        return None
    uv_map = _uv_map_read(obj, found[0])
    return BaseColour(found[0].image, uv_map, found[1]) if uv_map in obj.data.uv_layers else None


def _uv_map_read(obj: Any, image_node: Any) -> str:
    """The UV map an Image Texture node reads through: its UV Map node's, else the mesh's render map."""
    vector = image_node.inputs["Vector"].links
    if vector and vector[0].from_node.type == "UVMAP" and vector[0].from_node.uv_map:
        return vector[0].from_node.uv_map
    return next((uv.name for uv in obj.data.uv_layers if uv.active_render), "")


def image_problem(obj: Any) -> str | None:
    """Why a Base Color image Kiln would read is unusable (no image picked, its file missing, its
    UV map gone), naming the fix; None when there is none. An artist who sees an image on the model
    would not believe "no image", and a bake would only copy the missing-image pink."""
    for slot in obj.material_slots:
        for socket in base_colour_sockets(slot.material):
            found = _image_behind(socket, placed_any_way=True)
            if found is None:
                continue
            source = found[0]
            image, where = source.image, f"the Image Texture on {slot.material.name!r}'s Base Color"
            if image is None:
                return f"{where} holds no image: pick one in it"
            if 0 in tuple(image.size):
                return (f"{where} shows {image.name!r}, which has no pixels (its file {image.filepath!r} is missing "
                        "or unreadable): find it (File > External Data > Find Missing Files)")
            if _reads_uvs(source) and _uv_map_read(obj, source) not in obj.data.uv_layers:
                return (f"{where} reads {image.name!r} through the UV map {_uv_map_read(obj, source)!r}, which "
                        f"{obj.name!r} lacks: pick one of its maps in the UV Map node feeding it")
    return None


def unreadable_colour(obj: Any) -> str | None:
    """The first node through which a material slot's Base Color comes that Kiln cannot read from an
    image or a colour (a procedural texture, a ramp, a Hue/Saturation tweak), or a shader that keeps
    its colour inside (a Diffuse BSDF, an Emission, a node group that paints inside itself); None
    when every slot reads directly. Such colours are baked to refine from, and for references and
    exported assets, which would otherwise go grey."""
    for slot in obj.material_slots:
        material = slot.material
        if not uses_nodes(material):
            continue
        sockets = base_colour_sockets(material)
        for socket in sockets:
            if socket.links and _image_behind(socket) is None:
                found = _image_behind(socket, placed_any_way=True)
                if found is not None:
                    return (f"the Image Texture {found[0].name!r} on {material.name!r}, placed by other than a UV "
                            "map as it is (a Mapping node, box projection, generated coordinates)")
                return f"the node {socket.links[0].from_node.name!r} on {material.name!r}"
        output = output_node(material)
        surface = output.inputs["Surface"].links if output is not None else ()
        if not sockets and surface:  # an Emission (an unlit look), a Toon or Glass BSDF: no Base Color
            return f"the shader {surface[0].from_node.name!r} on {material.name!r}"
    return None


def slot_sources(obj: Any) -> list[BaseColour | list[float] | None] | None:
    """What each material slot shows: its Base Color image and UV map, else its flat colour, else
    None (no Principled BSDF); None when every slot shows the same, so that one image or colour
    tells the whole story."""
    sources = [_material_image(obj, slot.material) or flat_colour_of(slot.material) for slot in obj.material_slots]
    shown = {(s.key, s.uv_map) if isinstance(s, BaseColour) else (tuple(s) if s else None) for s in sources}
    tiled = any(isinstance(s, BaseColour) and is_udim(s.image) for s in sources)
    return sources if len(shown) > 1 or tiled else None


def is_udim(image: Any) -> bool:
    return image.source == "TILED" and len(image.tiles) > 1


def image_rgba8(image: Any, max_side: int = protocol.MAX_TEXTURE_SIZE) -> np.ndarray:
    """An image's pixels as (H, W, 4) uint8, rows bottom-up, display-referred (sRGB): float
    images hold linear values and get the sRGB transfer curve first. Images wider than Kiln's
    largest texture come averaged down by a whole factor (an 8K map would not fit one message, and
    a job works at ``max_side`` at most), dropping the last few texels of a side that factor does not
    divide: under one texel of the result."""
    w, h = image.size
    px = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(px)
    px = px.reshape(h, w, 4)
    factor = -(-max(w, h) // max_side)
    if factor > 1:  # summed view by view, in place: a reshaped mean copies the whole image (4 s at 8K)
        hs, ws = h // factor, w // factor
        total = np.zeros((hs, ws, 4), np.float32)
        for dy in range(factor):
            for dx in range(factor):
                total += px[dy:hs * factor:factor, dx:ws * factor:factor]
        px = np.multiply(total, np.float32(1 / factor ** 2), out=total)
    if image.is_float:
        px[..., :3] = _linear_to_srgb(px[..., :3])
    # In place: this runs on Blender's main thread as a refine job starts, on up to 64M values.
    np.clip(px, 0, 1, out=px)
    px *= 255
    px += 0.5
    return px.astype(np.uint8)


def tile_rgba8(image: Any, number: int) -> np.ndarray | None:
    """One tile of a UDIM image past its first (``image_rgba8``), or None when it has no pixels to
    read. Blender's Python reads only an image's first tile, so the others are loaded from their
    files, or their packed data, as images of their own for a moment."""
    packed = next((p for p in image.packed_files if p.tile_number == number), None)
    with tempfile.TemporaryDirectory() as folder:
        if packed is not None:
            path = Path(folder) / f"tile{Path(packed.filepath).suffix}"
            path.write_bytes(packed.packed_file.data)
        else:
            u, v = (number - 1001) % 10, (number - 1001) // 10
            path = Path(bpy.path.abspath(image.filepath, library=image.library).replace("<UDIM>", str(number))
                        .replace("<UVTILE>", f"u{u + 1}_v{v + 1}"))
        if not path.is_file():
            return None
        tile = bpy.data.images.load(str(path), check_existing=False)
        try:
            tile.colorspace_settings.name = image.colorspace_settings.name
            return image_rgba8(tile) if tile.size[0] and tile.size[1] else None
        finally:
            bpy.data.images.remove(tile)


#: The sRGB curve over 65,536 steps of [0, 1]: within 1e-4 of it (a byte is 4e-3 wide) and a
#: twelfth of its time on a 4096² float image (0.16 s against 2.0 s), on Blender's main thread.
_TO_SRGB = linear_to_srgb(np.linspace(0.0, 1.0, 65536)).astype(np.float32)
#: sRGB bytes to linear, exact: every colour converted this way comes from an 8-bit image or preview.
_BYTE_TO_LINEAR = srgb_to_linear(np.arange(256) / 255).astype(np.float32)


def srgb_bytes_to_linear(colours: np.ndarray) -> np.ndarray:
    """uint8 sRGB values as linear float32, exactly."""
    return _BYTE_TO_LINEAR[colours]


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """Linear [0, 1] (clamped) to sRGB, through ``_TO_SRGB``."""
    steps = np.clip(c, 0, 1).astype(np.float32)
    steps *= 65535
    steps += 0.5
    return _TO_SRGB[steps.astype(np.uint16)]


def linear_flat_colour(material: Any) -> list[float] | None:
    """A material's Principled Base Color value, linear as Blender holds it (and as an OBJ's Kd
    and glTF's factor carry it; a material without nodes: its colour); None without a Principled
    BSDF."""
    if material is not None and not uses_nodes(material):
        return [float(v) for v in material.diffuse_color[:3]]
    for socket in base_colour_sockets(material):
        return [float(v) for v in socket.default_value[:3]]
    return None


def flat_colour_of(material: Any) -> list[float] | None:
    """``linear_flat_colour`` display-referred (sRGB): what an object painted with a colour rather
    than an image looks like."""
    linear = linear_flat_colour(material)
    return None if linear is None else [float(v) for v in _linear_to_srgb(np.array(linear))]


def flat_colour(obj: Any) -> list[float] | None:
    """The first material slot's flat colour (``flat_colour_of``)."""
    return next((c for c in (flat_colour_of(slot.material) for slot in obj.material_slots) if c is not None), None)
