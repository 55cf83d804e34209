"""The colours an object's materials show, baked by Cycles: how Refine starts from a material
whose Base Color Kiln cannot read from an image (procedural textures, colour ramps, vertex
colours, a Hue/Saturation tweak, flat colours), since Cycles evaluates any node tree.

Each Principled or Diffuse BSDF is stood in for by an Emission of its colour, and the Emit pass
baked: the Diffuse Color pass would darken colours by the specular layer's share and turn metals
black. That, a temporary image node made active in each material, Cycles as the render engine
and the object alone selected are all put back as they were, whatever happens.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import bpy
import numpy as np

from .materials import image_rgba8, uses_nodes
from .scene_io import SceneError

#: Texels of colour grown past each UV island's edge, per 1024 texels of size: the backend samples
#: the start texture at exact UVs, but mipmaps and bilinear reads at seams reach a little past them.
MARGIN_PER_1024 = 4


#: The size the colours of a reference (a reference object, a .blend asset exported for the
#: libraries) are baked at when Kiln cannot read them: the backend renders references at the
#: model's resolution, 512² for SD 1.5.
REFERENCE_SIZE = 1024

#: The way out a refusal offers, by what the bake is for.
REFINE, REFERENCE = "untick Refine Existing Texture", "pick another reference object"
EXPORT = "leave it: Kiln exports it for the libraries with flat colours"


def _bake_uv_map(obj: Any, instead: str) -> str:
    """The UV map a bake writes through, Blender's render map; SceneError naming the fix when there
    is none or its faces spread over several UV tiles (one image cannot hold those)."""
    mesh = obj.data
    layer = next((uv for uv in mesh.uv_layers if uv.active_render), None)
    if layer is None:
        raise SceneError(f"{obj.name!r} has no UV map to carry the colours its material shows: add one (Edit Mode > "
                         f"UV > Smart UV Project), or {instead}", "add_uv_map", obj)
    uv = np.empty(len(mesh.loops) * 2, np.float32)
    layer.data.foreach_get("uv", uv)
    if uv.size and (uv.min() < -1e-4 or uv.max() > 1 + 1e-4):
        raise SceneError(f"{obj.name!r}'s UV map {layer.name!r} reaches past the unit square (UDIM tiles or "
                         "repeats), so its material's colours cannot be baked into one image: wire an "
                         f"Image Texture into Base Color, or {instead}")
    return layer.name


def bake_base_colour(obj: Any, size: int, instead: str = REFINE) -> tuple[np.ndarray, str]:
    """(size, size, 4) uint8 of the Base Color ``obj``'s materials show, lighting left out, rows
    bottom-up, and the UV map it lies on; refusals offer ``instead`` as the way out."""
    linked = [d.name for d in (obj, obj.data, *(s.material for s in obj.material_slots if s.material))
              if d.library is not None]
    if linked:  # Blender bakes only local objects, and into local materials (a linked one bakes nothing)
        raise SceneError(f"Kiln bakes the colours {obj.name!r} shows, which Blender does only for local objects and "
                         f"materials, and {', '.join(map(repr, dict.fromkeys(linked)))} "
                         f"{'is' if len(set(linked)) == 1 else 'are'} linked from another file: make "
                         f"{'it' if len(set(linked)) == 1 else 'them'} local (Object > Relations > Make Local > "
                         f"Selected Objects, Data and Materials), or {instead}")
    uv_map = _bake_uv_map(obj, instead)
    materials = list(dict.fromkeys(slot.material for slot in obj.material_slots))
    if not materials:
        raise SceneError(f"{obj.name!r} has no material, so it shows no colours to start from: give it one, or "
                         f"{instead}")
    if any(m is None or not uses_nodes(m) for m in materials):
        raise SceneError(f"{obj.name!r} has an empty material slot or a material without nodes (Use Nodes off), "
                         f"so the colours it shows cannot be baked: give each slot a node material, or {instead}")
    if not hasattr(bpy.context.scene, "cycles"):
        raise SceneError("Kiln bakes the colours of this material with Cycles, which is turned off: enable it "
                         f"(Preferences > Add-ons > Cycles Render Engine), or {instead}")
    image = bpy.data.images.new("Kiln bake", size, size)
    try:
        with ExitStack() as stack:
            for tree in _trees(materials):
                stack.enter_context(_colours_as_emission(tree))
            for material in materials:
                stack.enter_context(_active_image_node(material, image))
            stack.enter_context(_alone_and_shown(obj))  # refused for an object outside the view layer
            stack.enter_context(_cycles_for_baking())
            stack.enter_context(_busy_cursor())
            bpy.ops.object.bake(type="EMIT", uv_layer=uv_map, use_clear=True, target="IMAGE_TEXTURES",
                                margin=max(1, size * MARGIN_PER_1024 // 1024), use_selected_to_active=False)
        return image_rgba8(image), uv_map
    except RuntimeError as error:
        raise SceneError(f"Cycles could not bake the colours {obj.name!r} shows ({str(error).strip()}): make it "
                         f"visible (in the view layer, shown in viewports and renders), or {instead}") from None
    finally:
        bpy.data.images.remove(image)


#: The shaders whose colour a bake reads, and the input that holds it.
_COLOUR_INPUTS = {"BSDF_PRINCIPLED": "Base Color", "BSDF_DIFFUSE": "Color"}


def _trees(materials: list[Any]) -> list[Any]:
    """The materials' node trees and the node groups inside them, each once."""
    found, todo = [], [m.node_tree for m in materials]
    while todo:
        tree = todo.pop()
        if tree in found:
            continue
        found.append(tree)
        todo += [n.node_tree for n in tree.nodes if n.type == "GROUP" and n.node_tree is not None]
    return found


@contextmanager
def _colours_as_emission(tree: Any) -> Iterator[None]:
    """Each Principled and Diffuse BSDF of ``tree`` stood in for by an Emission of its colour, wired
    where it was (so a Mix Shader mixes the colours as it mixed the shaders)."""
    stand_ins = []
    for node in [n for n in tree.nodes if n.type in _COLOUR_INPUTS]:
        colour, shader = node.inputs[_COLOUR_INPUTS[node.type]], node.outputs[0]
        emission = tree.nodes.new("ShaderNodeEmission")
        emission.inputs["Color"].default_value = colour.default_value
        emission.inputs["Strength"].default_value = 1.0
        if colour.links:
            tree.links.new(colour.links[0].from_socket, emission.inputs["Color"])
        targets = [link.to_socket for link in shader.links]
        for target in targets:
            tree.links.new(emission.outputs[0], target)
        stand_ins.append((emission, shader, targets))
    try:
        yield
    finally:
        for emission, shader, targets in stand_ins:
            tree.nodes.remove(emission)
            for target in targets:
                tree.links.new(shader, target)


@contextmanager
def _active_image_node(material: Any, image: Any) -> Iterator[None]:
    """An Image Texture node showing ``image``, active (where Cycles bakes to) for the duration."""
    nodes = material.node_tree.nodes
    before = nodes.active
    node = nodes.new("ShaderNodeTexImage")
    node.image = image
    nodes.active = node
    try:
        yield
    finally:
        nodes.remove(node)
        if before is not None:
            nodes.active = before


@contextmanager
def _alone_and_shown(obj: Any) -> Iterator[None]:
    """``obj`` alone selected and active (Blender bakes every selected object) and shown: a
    reference object is often hidden, from the viewport or from renders, which baking skips."""
    layer = bpy.context.view_layer
    selected, active = list(bpy.context.selected_objects), layer.objects.active
    hidden = (obj.hide_get(), obj.hide_viewport, obj.hide_render, obj.hide_select)
    obj.hide_set(False)
    obj.hide_viewport = obj.hide_render = obj.hide_select = False
    try:
        for other in selected:
            other.select_set(False)
        obj.select_set(True)
        layer.objects.active = obj
        yield
    finally:
        obj.select_set(False)
        obj.hide_viewport, obj.hide_render, obj.hide_select = hidden[1:]
        obj.hide_set(hidden[0])
        for other in selected:
            other.select_set(True)
        layer.objects.active = active


@contextmanager
def _busy_cursor() -> Iterator[None]:
    """The wait cursor while Cycles bakes on the main thread (0.7 s at 1024², 2.1 s at 2048² for
    50k faces on two cores, ``bench/slice.py``): the only sign Blender has not hung."""
    window = bpy.context.window
    if window is not None:
        window.cursor_set("WAIT")
    try:
        yield
    finally:
        if window is not None:
            window.cursor_set("DEFAULT")


@contextmanager
def _cycles_for_baking() -> Iterator[None]:
    """Cycles on the CPU, one sample: a colour pass has no noise to average away, and the GPU is
    the backend's."""
    scene = bpy.context.scene
    saved = (scene.render.engine, scene.cycles.samples, scene.cycles.device)
    scene.render.engine = "CYCLES"
    scene.cycles.samples, scene.cycles.device = 1, "CPU"
    try:
        yield
    finally:
        scene.render.engine = saved[0]
        scene.cycles.samples, scene.cycles.device = saved[1:]
