"""Assets inside .blend files: Blender's own asset libraries, and .blend files in Kiln's folders.

The backend has no Blender, so the add-on exports each mesh-object or collection asset once, as
OBJ with its materials (Base Color images as PNG; colours from other nodes, such as a procedural
wood, baked by Cycles; else flat colours) and a caption from the asset's metadata (name,
description, tags), into a cache folder that the backend indexes like any other library. A
.blend is exported again only when it changes; its exports go when it goes. Main thread only:
appending touches ``bpy.data``, and everything appended is removed again at once.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import bpy
import numpy as np

from .bake import EXPORT, REFERENCE_SIZE, bake_base_colour
from .backend import protocol
from .materials import base_colour_rgba8, image_problem, linear_flat_colour, unreadable_colour
from .scene_io import SceneError, world_corners
from .texture_file import png_bytes

SOURCE_FILE = "source.json"

#: Object types exported as the mesh they evaluate to: a lamp's bevelled-curve cable or a sign's
#: text is part of what the asset looks like.
SURFACES = {"MESH", "CURVE", "SURFACE", "FONT", "META"}


def cache_root() -> Path:
    """Where exported .blend assets live: the extension's user folder (never the add-on's own)."""
    return Path(bpy.utils.extension_path_user(__package__, path="blend_assets", create=True))


def blend_files(folders: Iterable[str]) -> list[Path]:
    """Every .blend under ``folders`` (hidden folders and Blender's backups skipped), in order."""
    found: set[Path] = set()
    for folder in folders:
        root = Path(folder)
        if root.is_dir():
            found.update(p.resolve() for p in root.rglob("*.blend")
                         if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return sorted(found)


def export_folder(blend: Path) -> Path:
    """One folder per .blend, named for it and its path (two libraries may hold a "props.blend")."""
    digest = hashlib.sha1(str(blend).encode()).hexdigest()[:8]
    return cache_root() / f"{re.sub(r'[^A-Za-z0-9_-]+', '_', blend.stem)}-{digest}"


def is_current(blend: Path) -> bool:
    source = export_folder(blend) / SOURCE_FILE
    if not source.is_file():
        return False
    stat = blend.stat()
    return json.loads(source.read_text()) == {"blend": str(blend), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def drop_stale(blends: list[Path]) -> list[str]:
    """Remove the exports of .blend files that are no longer in any library; their names."""
    keep = {export_folder(b).name for b in blends}
    gone = [d for d in cache_root().iterdir() if d.is_dir() and d.name not in keep]
    for folder in gone:
        shutil.rmtree(folder, ignore_errors=True)
    return [d.name for d in gone]


def export_blend(blend: Path) -> tuple[int, list[str]]:
    """Export the .blend's mesh and collection assets; returns how many, and notes on what was
    skipped or exported with flat colours. Appended data is removed before returning, whatever
    happens; a file that cannot be read leaves no export behind (and is tried again at the next
    indexing)."""
    folder = export_folder(blend)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    kinds = ("objects", "meshes", "materials", "images", "collections", "node_groups", "textures", "scenes",
             "libraries")
    before = {kind: set(getattr(bpy.data, kind)) for kind in kinds}
    notes: list[str] = []
    written = 0
    try:
        with bpy.data.libraries.load(str(blend), link=False, assets_only=True) as (src, dst):
            dst.objects, dst.collections = list(src.objects), list(src.collections)
        assets = [(o, [o]) for o in dst.objects if o is not None] + \
                 [(c, list(c.all_objects)) for c in dst.collections if c is not None]
        scratch = scratch_scene({o for _, objects in assets for o in objects if o.type in SURFACES})
        depsgraph = scratch.view_layers[0].depsgraph
        for asset, objects in assets:
            with evaluated_meshes([o for o in objects if o.type in SURFACES], depsgraph) as meshes:
                shown = [obj for obj, _ in meshes]
            if not shown:
                notes.append(f"skipped {blend.name}: {asset.name} has no mesh to read")
                continue
            baked = {}  # before the meshes are read for writing: giving one a UV map re-evaluates them all
            for obj in (o for o in shown if o.type == "MESH"):  # Blender bakes meshes only
                baked[obj.name], problem = baked_colours(obj, scratch)
                if problem:
                    notes.append(f"{blend.name}: {asset.name} exported with flat colours: {problem}")
            depsgraph.update()
            with evaluated_meshes(shown, depsgraph) as meshes:
                write_obj(folder, asset.name, meshes, caption(asset), baked)
            written += 1
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        added = [i for kind in kinds[:-1] for i in set(getattr(bpy.data, kind)) - before[kind]]
        bpy.data.batch_remove(added)
        for library in set(bpy.data.libraries) - before["libraries"]:
            bpy.data.libraries.remove(library)
    stat = blend.stat()
    (folder / SOURCE_FILE).write_text(json.dumps({"blend": str(blend), "size": stat.st_size,
                                                  "mtime_ns": stat.st_mtime_ns}))
    return written, notes


def scratch_scene(objects: set[Any]) -> Any:
    """A scene of the appended objects (removed with the rest of the appended data) to evaluate and
    bake them in: an asset is what its modifiers make, and appended objects are in no scene."""
    scratch = bpy.data.scenes.new("Kiln export")
    for obj in objects:
        scratch.collection.objects.link(obj)
    scratch.view_layers[0].update()
    return scratch


def baked_colours(obj: Any, scratch: Any) -> tuple[np.ndarray | None, str]:
    """The colours ``obj``'s materials show, baked by Cycles in the scratch scene, when they come
    through nodes Kiln cannot read from an image (a procedural wood, a tiled texture): a flat colour
    would make a poor reference. An object without a UV map (procedural materials often need none)
    is given one by Smart UV Project first: it is the appended copy, removed after the export.
    (None, "") when no bake is needed; (None, why) when it cannot be done (UDIM, Cycles off) or
    an image the material shows is missing (a bake would copy Blender's pink)."""
    missing = image_problem(obj)
    if missing is not None:
        return None, missing
    if unreadable_colour(obj) is None:
        return None, ""
    try:
        # The operators find their object through the context, not the view layer alone.
        with bpy.context.temp_override(scene=scratch, view_layer=scratch.view_layers[0], object=obj,
                                       active_object=obj, selected_objects=[obj], selected_editable_objects=[obj]):
            if not obj.data.uv_layers:
                try:
                    _smart_uv_project(obj, scratch.view_layers[0])
                except RuntimeError as error:  # an operator refused: the asset keeps its flat colours
                    return None, f"it has no UV map, and Smart UV Project failed on it ({str(error).strip()})"
            return bake_base_colour(obj, REFERENCE_SIZE, EXPORT)[0], ""
    except SceneError as error:
        return None, str(error)


def _smart_uv_project(obj: Any, layer: Any) -> None:
    """A UV map for ``obj``'s mesh, by Smart UV Project in Edit Mode, in the scratch scene."""
    obj.data.uv_layers.new(name="UVMap")
    layer.objects.active = obj
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        # Named outright: else the operators take the edit object of the artist's scene, if any.
        with bpy.context.temp_override(edit_object=obj):
            bpy.ops.mesh.select_all(action="SELECT")
            bpy.ops.uv.smart_project(island_margin=0.01)
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")


@contextmanager
def evaluated_meshes(objects: list[Any], depsgraph: Any) -> Iterator[list[tuple[Any, Any]]]:
    """(object, its mesh after its modifiers) for those with faces; the meshes live until the block ends."""
    evaluated = [obj.evaluated_get(depsgraph) for obj in objects]
    try:
        pairs = [(obj, ev.to_mesh()) for obj, ev in zip(objects, evaluated, strict=True)]
        yield [(obj, mesh) for obj, mesh in pairs if len(mesh.polygons)]
    finally:
        for ev in evaluated:
            ev.to_mesh_clear()


def caption(asset: Any) -> str:
    """"oak chair: a sturdy oak chair (furniture, wood)": the name in words, the description, the tags."""
    text = protocol.name_words(asset.name)
    data = asset.asset_data
    if data is not None and data.description.strip():
        text += f": {data.description.strip()}"
    tags = [t.name for t in data.tags] if data is not None else []
    return text + (f" ({', '.join(tags)})" if tags else "")


def unused_stem(folder: Path, name: str) -> str:
    """A file name for asset ``name`` that no other asset of the .blend has taken: names that
    differ only in the characters OBJ and MTL files cannot hold ("Chair A", "Chair_A"; "Стул",
    "Стол") would otherwise overwrite each other's files. The caption keeps the real name."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:100] or "asset"
    stem, counter = base, 1
    while (folder / f"{stem}.obj").exists():
        counter += 1
        stem = f"{base}_{counter}"
    return stem


def write_obj(folder: Path, name: str, meshes: list[tuple[Any, Any]], text: str,
              baked: dict[str, np.ndarray | None] | None = None) -> Path:
    """One OBJ (Y-up, as OBJ files are read) for the (object, evaluated mesh) pairs in world space,
    one material per material slot: the image on its Base Color through the mesh's render UV map,
    else its colour; or one material for all of an object's faces where ``baked`` holds the colours
    its slots show on that map, by object name. Centred on the asset: its place in the .blend
    means nothing to a reference, and the file's six digits would blur an asset far from the
    origin."""
    stem = unused_stem(folder, name)
    lines, mtl, offset, uv_offset, materials = [f"mtllib {stem}.mtl"], [], 0, 0, {}
    worlds = []
    for obj, mesh in meshes:
        co = np.empty(len(mesh.vertices) * 3, np.float32)
        mesh.vertices.foreach_get("co", co)
        m = np.array(world_matrix(obj), np.float64)
        worlds.append(co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3])
    every = np.concatenate(worlds)
    centre = (every.min(axis=0) + every.max(axis=0)) / 2 if len(every) else np.zeros(3)
    for (obj, mesh), world in zip(meshes, worlds, strict=True):
        lines += [f"v {x:.6g} {z:.6g} {-y:.6g}" for x, y, z in world - centre]  # Blender's Z-up → OBJ's Y-up
        slots = np.empty(len(mesh.loop_triangles), np.int32)
        mesh.loop_triangles.foreach_get("material_index", slots)
        tris, loops = world_corners(mesh, np.array(world_matrix(obj), np.float64))
        tris, loops = tris + offset + 1, loops + uv_offset + 1
        layer = next((uv for uv in mesh.uv_layers if uv.active_render), None)
        if layer is not None:
            uv = np.empty(len(mesh.loops) * 2, np.float32)
            layer.data.foreach_get("uv", uv)
            lines += [f"vt {u:.6g} {v:.6g}" for u, v in uv.reshape(-1, 2)]
            uv_offset += len(mesh.loops)
        rgba = (baked or {}).get(obj.name)
        if rgba is not None and layer is not None:
            label = f"m{len(materials)}"
            materials[("baked", obj.name)] = label
            mtl += image_lines(folder, stem, label, rgba)
            slots[:] = -1  # one material for every face
        for slot in sorted(set(slots.tolist())):
            if slot < 0:
                label = materials[("baked", obj.name)]
            else:
                material = obj.material_slots[slot].material if slot < len(obj.material_slots) else None
                key = (material.name if material else "", layer is not None)
                if key not in materials:
                    materials[key] = f"m{len(materials)}"
                    mtl += material_lines(folder, stem, materials[key], material, layer is not None)
                label = materials[key]
            lines.append(f"usemtl {label}")
            for t, lp in zip(tris[slots == slot], loops[slots == slot], strict=True):
                lines.append("f " + " ".join(f"{v}/{u}" if layer is not None else f"{v}" for v, u in zip(t, lp)))
        offset += len(mesh.vertices)
    (folder / f"{stem}.mtl").write_text("\n".join(mtl) + "\n")
    path = folder / f"{stem}.obj"
    path.write_text("\n".join(lines) + "\n")
    (folder / f"{stem}.obj.txt").write_text(text + "\n")
    return path


def world_matrix(obj: Any) -> Any:
    """The object's placement from its own transform and its parents'. Appended objects are in no
    scene and never evaluated, so their stored ``matrix_world`` may be stale."""
    m = obj.matrix_basis
    while obj.parent is not None:
        m = obj.parent.matrix_basis @ obj.matrix_parent_inverse @ m
        obj = obj.parent
    return m


def material_lines(folder: Path, stem: str, label: str, material: Any, has_uvs: bool) -> list[str]:
    """An MTL entry: the Base Color image (if the mesh has UVs to read it through), else the colour."""
    rgba = base_colour_rgba8(material) if has_uvs else None
    if rgba is not None:
        return image_lines(folder, stem, label, rgba)
    colour = linear_flat_colour(material) or [0.3185] * 3  # Kd is linear: 0.6 grey in sRGB, as meshes without one
    return [f"newmtl {label}", "Kd {:.4f} {:.4f} {:.4f}".format(*colour)]


def image_lines(folder: Path, stem: str, label: str, rgba: np.ndarray) -> list[str]:
    """An MTL entry showing ``rgba`` (rows bottom-up, as Blender holds them and OBJ's UVs read
    them), written beside the OBJ as PNG."""
    png = f"{stem}_{label}.png"
    (folder / png).write_bytes(png_bytes(rgba[..., :3]))  # map_Kd holds colour only
    return [f"newmtl {label}", "Kd 1 1 1", f"map_Kd {png}"]
