"""The add-on in real Blender (the ``bpy`` module): build and install the zip, then drive the
operators against a real backend subprocess running the tiny model on the CPU."""

from __future__ import annotations

import importlib
import math
import os
import signal
import shutil
import subprocess
import sys
import threading
import time
import types
import venv
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")
import bmesh  # noqa: E402  (comes with bpy)
import mathutils  # noqa: E402  (comes with bpy)

from conftest import BACKEND_PYTHON, ROOT, start_standing_backend  # noqa: E402

import build  # noqa: E402


@pytest.fixture(scope="module")
def kiln(tmp_path_factory):
    """Build the zip, check it with Blender's validator, install and enable it."""
    zip_path = build.build(tmp_path_factory.mktemp("dist"))
    assert build.validate(zip_path), "Blender's extension validator did not run"
    names = zipfile.ZipFile(zip_path).namelist()
    assert "blender_manifest.toml" in names and "backend/protocol.py" in names and "__init__.py" in names
    bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default", enable_on_install=True)
    package = next(name for name in bpy.context.preferences.addons.keys() if name.endswith(".kiln"))
    addon = importlib.import_module(package)
    yield addon
    addon.session.MANAGER.stop()


@pytest.fixture
def scene(kiln, tmp_path):
    """An empty scene saved to a temporary .blend, with Kiln set to the tiny model."""
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences
    prefs.python_path = BACKEND_PYTHON
    settings = bpy.context.scene.kiln
    settings.prompt, settings.model, settings.texture_size, settings.steps, settings.seed = \
        "a wooden crate", "tiny", 512, 2, 0
    return settings


def add_cube(name: str = "Cube", uvs: bool = True, artist_material: bool = True):
    bpy.ops.mesh.primitive_cube_add()
    obj = bpy.context.active_object
    obj.name = name
    if not uvs:
        while obj.data.uv_layers:
            obj.data.uv_layers.remove(obj.data.uv_layers[0])
    if artist_material:
        mat = bpy.data.materials.new(f"Artist {name}")
        image = bpy.data.images.new(f"Artist texture {name}", 8, 8)
        if not mat.node_tree:  # Blender < 5 makes node trees only on request
            mat.use_nodes = True
        node = mat.node_tree.nodes.new("ShaderNodeTexImage")
        node.image = image
        obj.data.materials.append(mat)
    return obj


def select(*objects) -> None:
    for obj in bpy.context.scene.objects:
        obj.select_set(obj in objects)
    if objects:
        bpy.context.view_layer.objects.active = objects[0]


def pixels(image) -> np.ndarray:
    out = np.empty(len(image.pixels), np.float32)
    image.pixels.foreach_get(out)
    return out


def test_texture_selected_end_to_end_with_undo(kiln, scene, monkeypatch) -> None:
    obj = add_cube()
    select(obj)
    checksums = []
    original_update = kiln.scene_io.LiveTexture.update

    frames = []

    def spy(self, rgba):
        original_update(self, rgba)
        checksums.append(float(pixels(self.image).sum()))
        frames.append(rgba)
    monkeypatch.setattr(kiln.scene_io.LiveTexture, "update", spy)

    bpy.ops.ed.undo_push(message="before Kiln")
    assert bpy.ops.kiln.texture_selected("EXEC_DEFAULT", True) == {"FINISHED"}

    target = kiln.operators.ACTIVE.targets[0]
    assert target.status == "finished"
    assert target.progress_log == sorted(target.progress_log) and target.progress_log[-1] == target.total
    assert len(checksums) >= 2 and len(set(checksums)) >= 2, "the texture never changed while streaming"
    mat = obj.material_slots[0].material
    assert mat.name == "Kiln Cube"
    base = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"]
    tex = base.links[0].from_node
    assert tex.type == "TEX_IMAGE" and tex.image.name == "Kiln Cube" and tex.extension == "REPEAT"
    uv_node = tex.inputs["Vector"].links[0].from_node
    assert uv_node.type == "UVMAP" and uv_node.uv_map == "UVMap"  # the cube's own UVs, untouched
    saved = Path(bpy.path.abspath(tex.image.filepath))
    assert saved.is_file() and saved.parent.name == "kiln_textures" and saved.stat().st_size > 1000
    px = pixels(tex.image).reshape(512, 512, 4)  # read back from the PNG, written off the main thread
    assert px[..., :3].std() > 0.01 and np.allclose(px[..., 3], 1.0)
    last = np.frombuffer(frames[-1].data, np.uint8).reshape(512, 512, 4)
    assert tex.image.source == "FILE" and np.array_equal((px * 255 + 0.5).astype(np.uint8), last)
    artist = bpy.data.materials["Artist Cube"]
    assert artist.use_fake_user and kiln.scene_io.recorded_materials(obj) == [artist]

    select(obj)
    bpy.ops.kiln.texture_selected()  # again, same seed: the first result's file must survive
    again = obj.material_slots[0].material.node_tree.nodes
    assert [n.name for n in again if n.name.startswith("Kiln")] == ["Kiln Texture", "Kiln UV"]  # not piled up
    second = Path(bpy.path.abspath(again[kiln.scene_io.TEXTURE_NODE].image.filepath))
    assert second != saved and second.is_file() and saved.is_file()

    bpy.ops.ed.undo()
    obj = bpy.data.objects["Cube"]
    assert obj.material_slots[0].material.name == "Artist Cube"
    assert "Kiln Cube" not in bpy.data.materials and "Kiln Cube" not in bpy.data.images
    assert "Artist texture Cube" in bpy.data.images


def test_several_objects_and_a_mesh_without_uvs(kiln, scene) -> None:
    plain = add_cube("Plain", uvs=False, artist_material=False)
    other = add_cube("Other")
    other.location.x = 3
    select(plain, other)
    scene.method, scene.steps = "sds", 4  # every method runs from the operator
    bpy.ops.kiln.texture_selected()
    assert [t.status for t in kiln.operators.ACTIVE.targets] == ["finished", "finished"]
    assert [uv.name for uv in plain.data.uv_layers] == ["KilnUV"]
    assert [uv.name for uv in other.data.uv_layers] == ["UVMap"]
    uv = np.empty(len(plain.data.loops) * 2, np.float32)
    plain.data.uv_layers["KilnUV"].data.foreach_get("uv", uv)
    assert uv.min() >= 0 and uv.max() <= 1 and np.ptp(uv) > 0.5
    uv_node = next(n for n in plain.material_slots[0].material.node_tree.nodes if n.type == "UVMAP")
    assert uv_node.uv_map == "KilnUV"
    assert bpy.data.images["Kiln Plain"] != bpy.data.images["Kiln Other"]


def kiln_uvs(obj) -> np.ndarray:
    uv = np.empty(len(obj.data.loops) * 2, np.float32)
    obj.data.uv_layers["KilnUV"].data.foreach_get("uv", uv)
    return uv.reshape(-1, 2)


def test_a_mesh_edited_since_kiln_unwrapped_it_is_unwrapped_again(kiln, scene) -> None:
    """A fresh job reused the KilnUV map of an earlier one: faces extruded since had the UVs
    Blender interpolated for them, strips of no area that stretched one texel over each."""
    obj = add_cube("Plain", uvs=False, artist_material=False)
    select(obj)
    bpy.ops.kiln.texture_selected()
    first = kiln_uvs(obj)
    bpy.ops.kiln.texture_selected()  # unchanged: the map stays as it is
    assert np.array_equal(kiln_uvs(obj), first) and not any("changed" in n for n in kiln.operators.ACTIVE.notes)
    bm = bmesh.new()
    bm.from_mesh(obj.data)
    top = max(bm.faces, key=lambda f: f.calc_center_median().z)
    made = bmesh.ops.extrude_face_region(bm, geom=[top])["geom"]
    bmesh.ops.translate(bm, vec=(0, 0, 1), verts=[v for v in made if isinstance(v, bmesh.types.BMVert)])
    bm.to_mesh(obj.data)
    bm.free()
    obj.data.update()
    bpy.ops.kiln.texture_selected()
    assert kiln.operators.ACTIVE.targets[0].status == "finished"
    assert any("its faces changed since Kiln made its UV map 'KilnUV'" in n for n in kiln.operators.ACTIVE.notes)
    assert [uv.name for uv in obj.data.uv_layers] == ["KilnUV"]
    uv = kiln_uvs(obj)
    for face in obj.data.polygons:  # every face has UV area of its own again
        corners = uv[face.loop_start:face.loop_start + face.loop_total]
        x, y = corners[:, 0], corners[:, 1]
        assert abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2 > 1e-4
    scene.refine = True  # refining reads the texture through the map it was made on: kept
    bpy.ops.kiln.texture_selected()
    assert np.array_equal(kiln_uvs(obj), uv)


def udim_cube(name: str):
    """A subdivided cube whose UV map puts its top and bottom faces in UDIM tile 1002 and the
    rest in 1001; returns it and its map's UVs."""
    obj = add_cube(name)
    obj.modifiers.new("Subdivision", "SUBSURF").levels = 1
    uv = np.empty(len(obj.data.loops) * 2, np.float32)
    obj.data.uv_layers["UVMap"].data.foreach_get("uv", uv)
    uv = uv.reshape(-1, 2)
    for face in obj.data.polygons:
        if abs(face.normal.z) > 0.5:
            uv[list(face.loop_indices), 0] += 1
    obj.data.uv_layers["UVMap"].data.foreach_set("uv", uv.ravel())
    return obj, uv


def test_a_udim_map_is_textured_through_a_map_with_each_tile_in_its_own_cell(kiln, scene) -> None:
    """Kiln makes one image, which would repeat over every UDIM tile: the job textures each tile
    in a cell of it, through a KilnUDIM map added beside the artist's map, which stays as it was.
    Undo takes the map away with the rest of the job."""
    obj, uv = udim_cube("Tiled")
    select(obj)
    bpy.ops.ed.undo_push(message="before Kiln")
    bpy.ops.kiln.texture_selected("EXEC_DEFAULT", True)
    assert "KilnUDIM" in obj.data.uv_layers
    bpy.ops.ed.undo()
    obj = bpy.data.objects["Tiled"]
    assert [layer.name for layer in obj.data.uv_layers] == ["UVMap"]
    select(obj)
    for run in range(2):  # a second job rewrites the map instead of adding another
        bpy.ops.kiln.texture_selected()
        assert [t.status for t in kiln.operators.ACTIVE.targets] == ["finished"]
        notes = kiln.operators.ACTIVE.notes
        assert any("UDIM tiles 1001, 1002" in note and "'KilnUDIM'" in note for note in notes), notes
        assert not any("share texels" in note for note in notes)
        assert [layer.name for layer in obj.data.uv_layers] == ["UVMap", "KilnUDIM"]
    uv_node = next(n for n in obj.material_slots[0].material.node_tree.nodes if n.type == "UVMAP")
    assert uv_node.uv_map == "KilnUDIM"
    artist = np.empty(uv.size, np.float32)
    obj.data.uv_layers["UVMap"].data.foreach_get("uv", artist)
    assert np.array_equal(artist, uv.ravel())
    cells = np.empty(uv.size, np.float32)
    obj.data.uv_layers["KilnUDIM"].data.foreach_get("uv", cells)
    cells = cells.reshape(-1, 2)
    second = uv[:, 0] > 1.0001  # loops of faces in tile 1002 (none touches its left edge)
    scale, du, dv = kiln.scene_io.protocol.tile_cell(1, 2)
    assert np.allclose(cells[second], (uv[second] - [1, 0]) * scale + [du, dv], atol=1e-6)
    assert cells[second, 0].min() > 0.5 and cells[~second, 0].max() < 0.5 and cells.max() <= 1


def test_linked_duplicates_are_textured_once(kiln, scene) -> None:
    """Alt+D: one mesh, several objects, textured once; a duplicate whose slot is linked to the
    object (a material of its own) shows the texture too, and can restore its own material."""
    original = add_cube("Original", uvs=False)
    duplicate = bpy.data.objects.new("Duplicate", original.data)
    variant = bpy.data.objects.new("Variant", original.data)
    for obj in (duplicate, variant):
        bpy.context.collection.objects.link(obj)
    own = bpy.data.materials.new("Variant's own")
    variant.material_slots[0].link = "OBJECT"
    variant.material_slots[0].material = own
    select(duplicate, original, variant)
    bpy.ops.kiln.texture_selected()
    session = kiln.operators.ACTIVE
    assert [(t.name, t.status) for t in session.targets] == [("Duplicate", "finished")]
    assert [uv.name for uv in original.data.uv_layers] == ["KilnUV"]
    assert original.material_slots[0].material.name == "Kiln Duplicate"
    assert variant.material_slots[0].material.name == "Kiln Duplicate"
    assert any("Original shares its mesh with Duplicate" in note for note in session.notes)
    assert kiln.scene_io.recorded_materials(variant) == [own] and own.use_fake_user


def test_an_object_far_from_the_world_origin_is_sent_unblurred(kiln, scene) -> None:
    """A georeferenced scene: float32 world positions would round a cube a million units out by
    0.06 units and tilt nothing else; Kiln sends its shape centred, in world orientation and scale."""
    cube = add_cube("Far")
    cube.location, cube.rotation_euler, cube.scale = (1e6, -3e6, 5e5), (0, 0, math.pi / 4), (1, 1, 0.001)
    bpy.context.view_layer.update()
    _, arrays = kiln.scene_io.mesh_arrays(cube)
    positions = np.frombuffer(arrays["positions"].data, np.float32).reshape(-1, 3)
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], np.float64)
    turned = corners * [1, 1, 0.001] @ np.array(mathutils.Matrix.Rotation(math.pi / 4, 3, "Z")).T
    assert np.linalg.norm(positions[:, None] - turned[None], axis=2).min(axis=0).max() < 1e-6  # each corner


def test_a_mirrored_object_is_sent_with_its_faces_fronts_where_blender_shows_them(kiln, scene, tmp_path) -> None:
    """Negative scale winds a mesh's corners the other way round in world space, and Blender draws
    its fronts flipped back: a plane facing up, mirrored, faces up in what a job reads (which side
    of an open mesh it views) and in the OBJ a .blend asset is exported to."""
    bpy.ops.mesh.primitive_plane_add()
    plane = bpy.context.active_object
    plane.scale = (-1, 1, 1)
    bpy.context.view_layer.update()

    def normals(positions: np.ndarray, triangles: np.ndarray) -> np.ndarray:
        corners = positions[triangles]
        return np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    _, arrays = kiln.scene_io.mesh_arrays(plane)
    sent = normals(np.frombuffer(arrays["positions"].data, np.float32).reshape(-1, 3),
                   np.frombuffer(arrays["triangles"].data, np.int32).reshape(-1, 3))
    assert (sent[:, 2] > 0).all()
    mesh = plane.evaluated_get(bpy.context.evaluated_depsgraph_get()).data
    rows = [line.split() for line in kiln.blend_assets.write_obj(tmp_path, "Plane", [(plane, mesh)], "a plane")
            .read_text().splitlines()]
    vertices = np.array([[float(x) for x in r[1:]] for r in rows if r[0] == "v"])
    faces = np.array([[int(c.split("/")[0]) - 1 for c in r[1:]] for r in rows if r[0] == "f"])
    assert (normals(vertices, faces)[:, 1] > 0).all()  # OBJ is Y-up


def test_modifiers_are_textured_as_the_viewport_shows_them(kiln, scene) -> None:
    rounded = add_cube("Rounded")
    rounded.modifiers.new("Subdivision", "SUBSURF").levels = 1
    bent = add_cube("Bent", uvs=False)
    bent.location.x = 3
    bent.modifiers.new("Cast", "CAST").factor = 1.0  # moves vertices only: Kiln's UVs still fit the mesh
    fields, arrays = kiln.scene_io.mesh_arrays(rounded)
    positions = np.frombuffer(arrays["positions"].data, np.float32).reshape(-1, 3)
    assert arrays["triangles"].shape == (48, 3) and fields["loop_count"] == 96  # 24 quads after subdividing
    assert np.abs(positions).max() < 0.9  # the rounded shape, not the cage's corners at 1
    mirrored = add_cube("Mirrored")
    mirrored.data.transform(mathutils.Matrix.Translation((1.5, 0, 0)))
    mirrored.location.y = 3
    mirrored.modifiers.new("Mirror", "MIRROR")  # the other half on the same UVs: half the map is shared
    select(rounded, bent, mirrored)
    bpy.ops.kiln.texture_selected()
    assert [t.status for t in kiln.operators.ACTIVE.targets] == ["finished", "finished", "finished"]
    shared = [note for note in kiln.operators.ACTIVE.notes if "share texels" in note]
    assert len(shared) == 1 and shared[0].startswith("'Mirrored': 50% of its UV map's area"), shared
    assert len(rounded.modifiers) == 1 and len(rounded.data.loops) == 24  # the cage and its modifier are untouched
    assert [uv.name for uv in rounded.data.uv_layers] == ["UVMap"]
    assert [uv.name for uv in bent.data.uv_layers] == ["KilnUV"]
    uv_node = next(n for n in bent.material_slots[0].material.node_tree.nodes if n.type == "UVMAP")
    assert uv_node.uv_map == "KilnUV"


def run_session(kiln, objects, steps: int):
    fields = kiln.session.read_settings(bpy.context.scene.kiln)
    fields["steps"] = steps
    session = kiln.session.TextureSession(list(objects), fields, kiln.backend_process.BackendChoice(BACKEND_PYTHON),
                                          refine=bpy.context.scene.kiln.refine)
    session.start()
    return session


def pump_until(session, condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, session.summary()
        session.pump(timeout=0.05)


def test_cancel_mid_job_keeps_the_last_texture(kiln, scene) -> None:
    obj = add_cube()
    session = run_session(kiln, [obj], steps=100)
    target = session.targets[0]
    pump_until(session, lambda: target.live is not None)
    sent = time.monotonic()
    session.cancel()
    pump_until(session, lambda: session.finished)
    assert time.monotonic() - sent < 1.0
    assert target.status == "cancelled"
    assert obj.material_slots[0].material.name == "Kiln Cube"
    assert Path(bpy.path.abspath(target.live.image.filepath)).is_file()
    assert pixels(target.live.image)[:-4:4].std() > 0.01


def test_disabling_kiln_mid_job_keeps_the_last_texture_and_jobs_run_once_it_is_back(kiln, scene) -> None:
    """Disabling (or updating) the extension mid-job left the job running for good: once enabled
    again, Kiln refused every job ("A Kiln job is running") until Blender restarted."""
    obj = add_cube()
    session = kiln.operators.ACTIVE = run_session(kiln, [obj], steps=400)
    target = session.targets[0]
    pump_until(session, lambda: target.live is not None)
    bpy.ops.preferences.addon_disable(module=kiln.__name__)
    try:
        assert session.finished and target.status == "cancelled"
        assert obj.material_slots[0].material.name == "Kiln Cube"  # the last texture, written as Cancel writes it
        assert Path(bpy.path.abspath(target.live.image.filepath)).is_file()
    finally:
        bpy.ops.preferences.addon_enable(module=kiln.__name__)
    bpy.context.preferences.addons[kiln.__name__].preferences.python_path = BACKEND_PYTHON
    select(obj)
    assert bpy.ops.kiln.texture_selected("EXEC_DEFAULT", True) == {"FINISHED"}


def test_esc_while_the_model_loads_ends_the_job_at_once(kiln, scene, tmp_path, monkeypatch) -> None:
    """Esc during a first download held the job, and the panel, until the gigabytes were in."""
    from test_server import SLOW_PRIOR

    go = tmp_path / "loaded"
    (tmp_path / "slow_prior.py").write_text(SLOW_PRIOR.format(go=str(go)))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    kiln.session.MANAGER.stop()  # the next backend starts with the prior on its path
    bpy.context.scene.kiln.model = "python:slow_prior:make"
    try:
        obj = add_cube()
        session = run_session(kiln, [obj], steps=2)
        target = session.targets[0]
        pump_until(session, lambda: target.phase.startswith("loading model"))
        sent = time.monotonic()
        session.cancel()
        pump_until(session, lambda: session.finished, timeout=5)
        assert time.monotonic() - sent < 2 and target.status == "cancelled"
        assert any("goes on loading in the backend" in note for note in session.notes + target.notes)
        assert obj.material_slots[0].material.name == "Artist Cube"  # nothing of the job landed
    finally:
        go.touch()
        kiln.session.MANAGER.stop()


def saved_mid_job(kiln, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A job's texture when the .blend was saved (to ``path``) mid-job, and its last one."""
    obj = add_cube()
    session = kiln.operators.ACTIVE = run_session(kiln, [obj], steps=100)
    target = session.targets[0]
    pump_until(session, lambda: target.live is not None)
    image = target.live.image
    bpy.ops.wm.save_as_mainfile(filepath=str(path), copy=True)
    then = pixels(image)
    session.cancel()  # ends as a finished job does: its last texture written to its file
    pump_until(session, lambda: session.finished)
    assert image.packed_file is None and image.filepath == "//kiln_textures/Cube_seed0.png"  # the file, not the pack
    return then, pixels(image)


def test_a_file_saved_mid_job_keeps_the_texture_as_it_stood(kiln, scene, tmp_path) -> None:
    """Until a job ends its texture has no file, and Blender saves such an image blank: a .blend
    saved mid-job (an artist's habitual Ctrl+S), and not again, came back with a black object."""
    then, final = saved_mid_job(kiln, tmp_path / "mid-job.blend")
    bpy.ops.wm.save_mainfile()
    bpy.ops.wm.open_mainfile(filepath=bpy.data.filepath)
    assert np.array_equal(pixels(bpy.data.images["Kiln Cube"]), final)
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "mid-job.blend"))
    assert np.array_equal(pixels(bpy.data.images["Kiln Cube"]), then) and then[:-4:4].std() > 0.01


def test_ctrl_c_in_a_script_cancels_its_job_and_the_call_raises(kiln, scene, monkeypatch) -> None:
    """A batch run's Ctrl+C (a KeyboardInterrupt while the call waits on the job) ends the job as Esc
    does, last texture kept; the script went on to print "textured" and exit 0."""
    obj = add_cube()
    select(obj)
    scene.steps = 100
    pump = kiln.session.TextureSession.pump

    def interrupted(session, timeout: float = 0.0) -> None:
        pump(session, timeout)
        if session.targets[0].live is not None and not session.cancel_requested:
            raise KeyboardInterrupt

    monkeypatch.setattr(kiln.session.TextureSession, "pump", interrupted)
    with pytest.raises(RuntimeError, match=r"Kiln cancelled \(Ctrl\+C\); kept the last result"):
        bpy.ops.kiln.texture_selected()
    assert obj.material_slots[0].material.name == "Kiln Cube" and kiln.operators.ACTIVE.finished


def test_backend_killed_mid_job_then_a_new_job_restarts_it(kiln, scene) -> None:
    obj = add_cube()
    session = run_session(kiln, [obj], steps=100)
    target = session.targets[0]
    pump_until(session, lambda: target.done > 0)
    process = kiln.session.MANAGER.process
    os.kill(process.proc.pid, signal.SIGKILL)
    pump_until(session, lambda: session.finished, timeout=30)
    assert "lost the backend" in session.failure and "exit code -9" in session.failure
    assert target.status == "failed"
    assert obj.material_slots[0].material.name in ("Artist Cube", "Kiln Cube")  # the artist's or the last good one
    assert "Artist Cube" in bpy.data.materials and "Artist texture Cube" in bpy.data.images

    select(obj)
    bpy.ops.kiln.texture_selected()
    assert kiln.operators.ACTIVE.succeeded
    assert kiln.session.MANAGER.process.proc.pid != process.proc.pid


def empty_venv_python(tmp_path: Path) -> str:
    venv.create(tmp_path / "empty-env", with_pip=False)
    return str(tmp_path / "empty-env" / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))


@pytest.mark.parametrize("case, fragment", [
    ("nothing selected", "Select one or more mesh objects"),
    ("only a curve selected", r"Select one or more mesh objects: 'Rope' is a curve, not a mesh: convert it "
                              r"\(Object > Convert > Mesh\)"),
    ("camera selected", "is a camera, not a mesh: it has no surface to texture: deselect it"),
    ("empty selected", "is an empty, not a mesh: it has no surface to texture"),
    ("collection instance selected", "Make Instances Real"),
    ("no faces", "has no faces"),
    ("nan vertex", "NaN or infinite"),
    ("million faces", "Decimate"),
    ("modifiers make the faces", "after its modifiers"),
    ("modifiers change faces without uvs", "change its faces"),
    ("linked from a library", "Make Local"),
    ("empty prompt", "prompt is empty"),
    ("unknown model", "unknown model"),
    ("unknown lora", "unknown LoRA"),
    ("unknown vae", "unknown VAE"),
    ("weights offline", "Allow Online Access"),
    ("backend missing", "does not exist.*press Set Up Backend in Preferences"),
    ("backend without dependencies", "lacks Kiln's dependencies: press Set Up Backend"),
])
def test_bad_input_gets_a_clear_error_and_the_scene_is_untouched(kiln, scene, tmp_path, case, fragment) -> None:
    obj = add_cube()
    selection = [obj]
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences
    if case == "nothing selected":
        selection = []
    elif case == "only a curve selected":
        bpy.ops.curve.primitive_bezier_circle_add()
        bpy.context.active_object.name = "Rope"
        selection = [bpy.context.active_object]
    elif case == "camera selected":
        bpy.ops.object.camera_add()
        selection = [obj, bpy.context.active_object]
    elif case == "empty selected":
        bpy.ops.object.empty_add()
        selection = [obj, bpy.context.active_object]
    elif case == "collection instance selected":
        bpy.ops.object.collection_instance_add(collection=bpy.data.collections.new("Props").name)
        selection = [obj, bpy.context.active_object]
    elif case == "no faces":
        bpy.ops.object.mode_set(mode="EDIT")
        bpy.ops.mesh.select_all(action="SELECT")
        bpy.ops.mesh.delete(type="ONLY_FACE")
        bpy.ops.object.mode_set(mode="OBJECT")
    elif case == "nan vertex":
        obj.data.vertices[0].co.x = float("nan")
    elif case == "million faces":
        bpy.ops.mesh.primitive_grid_add(x_subdivisions=720, y_subdivisions=720)
        selection = [bpy.context.active_object]
    elif case == "modifiers make the faces":
        bpy.ops.mesh.primitive_grid_add(x_subdivisions=360, y_subdivisions=360)
        selection = [bpy.context.active_object]
        selection[0].modifiers.new("Subdivision", "SUBSURF").levels = 1  # 360² quads, 4x: over the limit
    elif case == "modifiers change faces without uvs":
        obj.data.uv_layers.remove(obj.data.uv_layers[0])
        obj.modifiers.new("Subdivision", "SUBSURF")
    elif case == "linked from a library":
        bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "library.blend"), copy=True)
        with bpy.data.libraries.load(str(tmp_path / "library.blend"), link=True) as (_, linked):
            linked.objects = ["Cube"]
        bpy.context.collection.objects.link(linked.objects[0])
        selection = [linked.objects[0]]
    elif case == "empty prompt":
        scene.prompt = "   "
    elif case == "unknown model":
        scene.model = "definitely not a model"
    elif case == "unknown lora":
        scene.lora = "no such lora"
    elif case == "unknown vae":
        scene.vae = "no such vae"
    elif case == "weights offline":
        scene.model = "kiln-tests/not-downloaded"
    elif case == "backend missing":
        prefs.python_path = str(tmp_path / "no" / "python")
    elif case == "backend without dependencies":
        prefs.python_path = empty_venv_python(tmp_path)
        kiln.session.MANAGER.stop()
    select(*selection)
    images_before = set(bpy.data.images.keys())
    with pytest.raises(RuntimeError, match=fragment):
        bpy.ops.kiln.texture_selected()
    assert obj.material_slots[0].material.name == "Artist Cube"
    assert set(bpy.data.images.keys()) == images_before
    assert not any(m.name.startswith("Kiln") for m in bpy.data.materials)


@pytest.mark.parametrize("fix", ["object_mode", "add_uv_map", "decimate", "make_local"])
def test_refusals_offer_a_fix_that_lets_the_job_start(kiln, scene, tmp_path, monkeypatch, fix) -> None:
    obj = add_cube(uvs=fix != "add_uv_map")
    if fix == "object_mode":  # Edit Mode, where faces are picked, the job leaves by itself
        select(obj)
        bpy.ops.object.mode_set(mode="SCULPT")
    elif fix == "add_uv_map":
        obj.modifiers.new("Subdivision", "SUBSURF")
        obj.data.vertices[0].select = False  # the artist's own selection, which the fix keeps
    elif fix == "decimate":
        monkeypatch.setattr(kiln.backend.protocol, "MAX_TRIANGLES", 500)  # decimating a million takes a minute
        obj.modifiers.new("Subdivision", "SUBSURF").levels = 3  # 768 triangles
    else:
        bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "library.blend"), copy=True)
        with bpy.data.libraries.load(str(tmp_path / "library.blend"), link=True) as (_, linked):
            linked.objects = ["Cube"]
        bpy.context.collection.objects.link(linked.objects[0])
        obj = linked.objects[0]
        arrays = kiln.scene_io.reference_arrays(obj)[1]  # only read as a reference, it may stay linked
        assert kiln.backend.protocol.REFERENCE_PREFIX + "positions" in arrays
    bystander = add_cube("Bystander")
    select(obj, bystander)
    with pytest.raises(RuntimeError):
        bpy.ops.kiln.texture_selected()
    refusal = kiln.operators.REFUSAL
    assert refusal.fix == fix and refusal.obj == obj.name_full
    assert bpy.ops.kiln.fix(action=refusal.fix, object=refusal.obj) == {"FINISHED"}
    assert kiln.operators.REFUSAL is None
    mended = bpy.context.view_layer.objects.active if fix != "make_local" else \
        next(o for o in bpy.context.selected_objects if o.name != "Bystander")
    assert {o.name for o in bpy.context.selected_objects} == {mended.name, "Bystander"}
    fields, arrays = kiln.scene_io.mesh_arrays(mended)  # what the job reads now passes
    if fix == "add_uv_map":
        assert "loop_uvs" in arrays and not mended.data.vertices[0].select and mended.data.vertices[1].select
    if fix == "decimate":
        assert arrays["triangles"].shape[0] <= kiln.backend.protocol.MAX_TRIANGLES


def test_texture_size_is_clamped_to_the_supported_range(scene) -> None:
    scene.texture_size = 100
    assert scene.texture_size == 512
    scene.texture_size = 100_000
    assert scene.texture_size == 4096


def run_example(example: str, blend: Path | None, *args: str) -> subprocess.CompletedProcess:
    """``examples/<example>`` in a fresh Blender process, as `blender -b FILE --python` would run
    it, on ``blend``, or on no file at all (None: the start-up scene, unsaved)."""
    opening = "bpy.ops.wm.open_mainfile(filepath=sys.argv[1])" if blend else "bpy.ops.wm.read_homefile()"
    script = (f"import sys, runpy, bpy; {opening}; sys.argv = ['blender', '--'] + sys.argv[2:]; "
              f"runpy.run_path({str(ROOT / 'examples' / example)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", script, str(blend), *args, "--backend-python", BACKEND_PYTHON],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


def run_batch(tmp_path: Path, *args: str, opened: bool = True) -> subprocess.CompletedProcess:
    """The batch texturing example (``run_example``) on a copy of Blender's start-up file (made
    once per test), or on no file at all (``opened`` False: the start-up scene, unsaved)."""
    blend, home = tmp_path / "batch.blend", tmp_path / "home.blend"
    if not home.exists():
        setup = f"import bpy; bpy.ops.wm.read_homefile(); bpy.ops.wm.save_as_mainfile(filepath={str(home)!r})"
        subprocess.run([sys.executable, "-c", setup], check=True, capture_output=True, env=dict(os.environ))
    shutil.copyfile(home, blend)
    return run_example("batch_texture.py", blend if opened else None, *args)


def refused_batch(capsys, *args: str) -> str:
    """A batch run that must refuse before any job starts, run in this Blender (a fresh process
    costs seconds each): its exit status 1 and what it said on stderr."""
    import runpy

    argv = sys.argv
    sys.argv = ["blender", "--", *args, "--backend-python", BACKEND_PYTHON]
    try:
        with pytest.raises(SystemExit) as exited:
            runpy.run_path(str(ROOT / "examples" / "batch_texture.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert exited.value.code == 1
    return capsys.readouterr().err


def test_batch_script_succeeds_headless_and_fails_loudly(kiln, tmp_path, capsys) -> None:
    ok = run_batch(tmp_path, "--prompt", "a crate", "--model", "tiny", "--size", "512", "--steps", "1", "--save")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "textured Cube" in ok.stdout
    assert (tmp_path / "kiln_textures" / "Cube_seed0.png").is_file()
    bad = run_batch(tmp_path, "--prompt", "", "--model", "tiny")
    assert bad.returncode == 1 and "batch_texture.py: the prompt is empty: type what" in bad.stderr, bad.stderr
    # Many batch runs can share one backend, and its loaded model, started by hand.
    proc, _ = start_standing_backend(tmp_path / "backend.json")
    shared = ["--model", "tiny", "--size", "512", "--connection-file", str(tmp_path / "backend.json")]
    try:
        ssd = run_batch(tmp_path, "--prompt", "a crate", "--steps", "3", "--method", "ssd", *shared)
        assert ssd.returncode == 0, ssd.stderr[-2000:]
        saved = run_batch(tmp_path, "--prompt", "a box", "--steps", "1", "--save", str(tmp_path / "crate.blend"),
                          *shared, opened=False)
        assert saved.returncode == 0, saved.stderr[-2000:]
    finally:
        proc.terminate()
        log = proc.communicate()[1]
    # Its terminal shows the jobs.
    assert "job 1: texture 'a crate' with tiny (ssd)" in log and "job 2: texture 'a box' with tiny (sir)" in log
    with bpy.data.libraries.load(str(tmp_path / "crate.blend")) as (held, taken):
        taken.images = ["Kiln Cube"]
    assert taken.images[0].packed_file is not None  # the job had no folder beside a file to write it to
    bpy.data.images.remove(taken.images[0])
    # The refusals below come before any job, so they run in this Blender, on a scene of one cube.
    bpy.ops.wm.read_homefile()
    # Blender would clamp these without a word; a pipeline hears of them instead.
    assert "--strength 3.0 is out of range: choose 0.05 to 1" in refused_batch(
        capsys, "--prompt", "a crate", "--model", "tiny", "--refine", "--strength", "3")
    assert "--lora-weight 3.0 is out of range: choose -2 to 2" in refused_batch(
        capsys, "--prompt", "a crate", "--model", "tiny", "--lora", "a/b", "--lora-weight", "3")
    assert "add --refine" in refused_batch(capsys, "--prompt", "a crate", "--model", "tiny", "--strength", "0.3")
    assert "batch_texture.py: Select one or more mesh objects: 'Camera' is a camera" in refused_batch(  # no poll()
        capsys, "--prompt", "a crate", "--model", "tiny", "--objects", "Camera")
    assert "--selected-faces keeps the other faces' texture" in refused_batch(
        capsys, "--prompt", "a crate", "--model", "tiny", "--selected-faces")
    # Blender opened no file: --save said nothing and the result was lost with the process.
    assert "--save has no file to save over (Blender opened none)" in refused_batch(
        capsys, "--prompt", "a crate", "--model", "tiny", "--save")
    nowhere = refused_batch(capsys, "--prompt", "a crate", "--model", "tiny", "--save",
                            str(tmp_path / "no" / "a.blend"))
    assert "the folder" in nowhere and "does not exist" in nowhere


def test_a_batch_run_textures_the_objects_an_artist_hid_and_leaves_them_hidden(kiln, tmp_path, capsys) -> None:
    """Blender selects no hidden object: one hidden in the viewport (H, or the monitor icon) went
    untextured while the script printed "textured" and exited 0."""
    bpy.ops.wm.read_homefile(use_empty=True)
    add_cube("Shown")
    eye, monitor = add_cube("Eye"), add_cube("Monitor")
    eye.hide_set(True)
    monitor.hide_viewport = True
    excluded = bpy.data.collections.new("Excluded")
    bpy.context.scene.collection.children.link(excluded)
    excluded.objects.link(bpy.data.objects.new("Elsewhere", bpy.data.meshes.new("Elsewhere")))
    bpy.context.view_layer.layer_collection.children["Excluded"].exclude = True
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "hidden.blend"))
    # The view layer's meshes: not the excluded one.
    ran = run_example("batch_texture.py", tmp_path / "hidden.blend", "--prompt", "a crate", "--model", "tiny",
                      "--size", "512", "--steps", "1", "--save")
    assert ran.returncode == 0 and "textured Shown, Eye, Monitor" in ran.stdout, ran.stderr[-2000:]
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "hidden.blend"))
    for name in ("Shown", "Eye", "Monitor"):
        assert bpy.data.objects[name].material_slots[0].material.name == f"Kiln {name}"
    assert bpy.data.objects["Eye"].hide_get() and bpy.data.objects["Monitor"].hide_viewport
    assert "Elsewhere is in a collection excluded from the view layer" in refused_batch(
        capsys, "--prompt", "a crate", "--model", "tiny", "--objects", "Elsewhere")


def test_a_batch_script_newer_than_the_installed_extension_says_so(kiln, scene, capsys) -> None:
    """A TD pulls the scripts and forgets to reinstall the zip: an option the installed Kiln lacks
    was a KeyError traceback."""
    import runpy

    batch = runpy.run_path(str(ROOT / "examples" / "batch_texture.py"))  # its functions, not its main
    assert not batch["assign"](bpy.context.scene.kiln, {"future_knob": ("--future-knob", 1.0)}, "batch_texture.py")
    assert "batch_texture.py: --future-knob needs a newer Kiln than the one installed in this Blender: install " \
        "dist/kiln-*.zip" in capsys.readouterr().err


class DrawnLayout:
    """Stands in for a UILayout, which Blender makes only when it draws a window (never in
    background mode), so that the add-on's draw code runs here: it records what a draw shows and
    checks it against real data, so a property or operator name that does not exist fails."""

    def __init__(self, shown: list) -> None:
        self.shown = shown

    def prop(self, data, name: str, **_: object) -> None:
        assert name in data.bl_rna.properties, f"{type(data).__name__} has no property {name!r}"
        self.shown.append(("prop", name))

    def operator(self, idname: str, **kw: object) -> types.SimpleNamespace:
        module, name = idname.split(".")
        assert hasattr(getattr(bpy.ops, module), name) and getattr(getattr(bpy.ops, module), name).get_rna_type()
        self.shown.append(("operator", idname, kw.get("text")))
        return types.SimpleNamespace()

    def label(self, text: str = "", **_: object) -> None:
        self.shown.append(("label", text))

    def __getattr__(self, name: str):
        def sub_layout(*_: object, **__: object) -> "DrawnLayout":  # row, box, column, progress, ...
            return DrawnLayout(self.shown)
        return sub_layout


def drawn(draw, owner, context, **attributes) -> list:
    shown: list = []
    draw(types.SimpleNamespace(layout=DrawnLayout(shown), **attributes) if owner is None else owner(shown), context)
    return shown


def panels_show(kiln) -> list:
    """What the Kiln tab shows, its sub-panels opened: each panel's header, then its body."""
    return [item for panel in kiln.panel.CLASSES
            for draw in (getattr(panel, "draw_header", None), panel.draw) if draw is not None
            for item in drawn(draw, None, bpy.context)]


def test_a_view_whose_shading_hides_textures_offers_material_preview(kiln, scene) -> None:
    """Blender starts in Solid shading, which shows colours, not textures: the panel offers to
    switch its view to Material Preview, and stops once the view shows textures. Kiln's image node
    is the material's active one, which Solid's Texture colour shows."""
    bpy.ops.wm.read_homefile()  # a file with a window and 3D view, as artists have
    screen = bpy.context.window.screen
    area = next(a for a in screen.areas if a.type == "VIEW_3D")
    view = area.spaces.active
    with bpy.context.temp_override(area=area, space_data=view):
        assert view.shading.type == "SOLID"
        assert ("operator", "kiln.show_textures", None) in panels_show(kiln)
        assert bpy.ops.kiln.show_textures() == {"FINISHED"}
        assert view.shading.type == "MATERIAL"
        assert not any(item[1:2] == ("kiln.show_textures",) for item in panels_show(kiln))
        view.shading.type, view.shading.color_type = "SOLID", "TEXTURE"
        assert not kiln.operators.hides_textures(view)
    obj = add_cube()
    kiln.scene_io.start_live_texture(obj, "UVMap", (8, 8))
    assert obj.material_slots[0].material.node_tree.nodes.active.name == kiln.scene_io.TEXTURE_NODE


def test_a_material_that_does_not_use_its_nodes_reads_as_its_colour(kiln, scene) -> None:
    """Before Blender 5 a material can keep nodes it does not use (Use Nodes off), and shows its
    Viewport Display colour: that colour is what a job reads, and its texture gets a plain material."""
    if bpy.app.version >= (5, 0):
        pytest.skip("Blender 5 materials always use their nodes")
    obj = add_cube()
    link_artist_image(obj)
    material = obj.material_slots[0].material
    material.use_nodes, material.diffuse_color = False, (1.0, 0.0, 0.0, 1.0)
    assert kiln.materials.existing_texture(obj) is None and kiln.materials.flat_colour(obj) == pytest.approx([1, 0, 0])
    kiln.scene_io.start_live_texture(obj, "UVMap", (8, 8))
    shown = obj.material_slots[0].material
    assert shown.use_nodes and not any(n.type == "TEX_IMAGE" and n.image.name.startswith("Artist")
                                       for n in shown.node_tree.nodes)


def test_restore_materials_puts_back_the_artists_after_several_jobs(kiln, scene) -> None:
    """Kiln's jobs record, slot by slot, the materials an object had before the first of them; a
    later job on Kiln's own material keeps that record. Restore Materials puts them back (and drops
    the slot Kiln added to a mesh that had none), as one undo step."""
    obj = add_cube()
    obj.data.materials.append(None)
    plain = add_cube("Plain", artist_material=False)
    select(obj, plain)
    assert not kiln.operators.KILN_OT_restore_materials.poll(bpy.context)
    for _ in range(2):  # two jobs
        for target in (obj, plain):
            kiln.scene_io.start_live_texture(target, "UVMap", (8, 8))
    artist = bpy.data.materials["Artist Cube"]
    assert kiln.scene_io.recorded_materials(obj) == [artist, None]
    artist.name = "Oak"  # renamed since: still put back
    assert obj.material_slots[0].material.name.startswith("Kiln Cube") and len(plain.material_slots) == 1
    drawn_ops = [item[1] for item in panels_show(kiln) if item[0] == "operator"]
    assert "kiln.restore_materials" in drawn_ops
    bpy.ops.ed.undo_push(message="textured")
    assert bpy.ops.kiln.restore_materials("EXEC_DEFAULT", True) == {"FINISHED"}
    assert [s.material for s in obj.material_slots] == [artist, None]
    assert len(plain.material_slots) == 0 and kiln.scene_io.PREVIOUS_MATERIALS not in obj
    assert not kiln.operators.KILN_OT_restore_materials.poll(bpy.context)
    bpy.ops.ed.undo()
    assert bpy.data.objects["Cube"].material_slots[0].material.name.startswith("Kiln Cube")


def test_an_unlit_material_gets_a_plain_one_whose_texture_shows(kiln, scene) -> None:
    """A Principled BSDF left unconnected beside an Emission (an unlit look) shows nothing: it is
    not read as the texture, and the job's texture goes on a plain material, where it shows."""
    obj = add_cube()
    link_artist_image(obj)
    tree = obj.material_slots[0].material.node_tree
    emission = tree.nodes.new("ShaderNodeEmission")
    output = tree.get_output_node("ALL")
    tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    assert kiln.materials.existing_texture(obj) is None
    kiln.scene_io.start_live_texture(obj, "UVMap", (8, 8))
    shown = obj.material_slots[0].material
    surface = shown.node_tree.get_output_node("ALL").inputs["Surface"].links[0].from_node
    assert surface.type == "BSDF_PRINCIPLED"
    assert surface.inputs["Base Color"].links[0].from_node.name == kiln.scene_io.TEXTURE_NODE


def test_an_unlit_materials_colours_are_baked_to_refine_from_and_as_a_reference(kiln, scene) -> None:
    """An Emission showing an image (an unlit look, baked lighting) has no Base Color to read: as
    a reference it was sent grey, and Refine said it showed flat colours. Cycles bakes what it shows."""
    obj = add_cube()
    link_artist_image(obj)
    tree = obj.material_slots[0].material.node_tree
    image = next(n for n in tree.nodes if n.type == "TEX_IMAGE")
    image.image.pixels.foreach_set(np.tile([1.0, 0.5, 0.0, 1.0], 64).astype(np.float32))  # orange
    emission = tree.nodes.new("ShaderNodeEmission")
    emission.name = "Unlit"
    tree.links.new(image.outputs["Color"], emission.inputs["Color"])
    tree.links.new(emission.outputs["Emission"], tree.get_output_node("ALL").inputs["Surface"])
    target = kiln.session.target_for(obj, refine=True, size=64)
    assert "through the shader 'Unlit' on 'Artist Cube', so Kiln baked" in target.notes[0]
    scene.use_references, scene.reference_source, scene.reference_object = True, "OBJECT", obj
    fields, arrays = kiln.session.reference_fields(scene, {})
    texture = arrays[kiln.backend.protocol.REFERENCE_PREFIX + "texture"]
    sent = np.frombuffer(texture.data, np.uint8).reshape(texture.shape)
    assert (255, 128, 0) in {tuple(c) for c in sent.reshape(-1, 4)[:, :3]}  # a byte image's pixels are sRGB


def test_edit_mode_shows_how_many_faces_only_selected_faces_repaints(kiln, scene) -> None:
    obj = add_cube()
    select(obj)
    scene.refine = scene.selected_faces = True
    bpy.ops.object.mode_set(mode="EDIT")
    edited = bmesh.from_edit_mesh(obj.data)
    for face in edited.faces:
        face.select_set(face.normal.z > 0.5)
    bmesh.update_edit_mesh(obj.data)
    assert ("label", "1 face to repaint") in panels_show(kiln)
    bpy.ops.mesh.select_all(action="DESELECT")
    assert ("label", "No faces selected to repaint") in panels_show(kiln)
    bpy.ops.object.mode_set(mode="OBJECT")
    assert not any("to repaint" in str(item) for item in panels_show(kiln))


def test_the_panel_and_preferences_draw_and_offer_set_up_when_no_backend_is_found(kiln, scene, monkeypatch) -> None:
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences

    class PreferencesView:  # the preferences' draw reads its own properties through ``self``
        def __init__(self, shown: list) -> None:
            self.layout = DrawnLayout(shown)

        def __getattr__(self, name: str):
            return getattr(prefs, name)

    shown = panels_show(kiln)
    assert ("prop", "prompt") in shown and ("operator", "kiln.texture_selected", None) in shown
    assert {("prop", "lora"), ("prop", "steps"), ("prop", "use_references")} <= set(shown)
    assert not {("prop", "lora_weight"), ("prop", "controlnet_weight")} & set(shown)  # beside their part only
    scene.lora, scene.controlnet = "latent-consistency/lcm-lora-sdv1-5", "lllyasviel/sd-controlnet-depth"
    assert {("prop", "lora_weight"), ("prop", "controlnet_weight")} <= set(panels_show(kiln))
    scene.lora = scene.controlnet = ""
    assert all(getattr(bpy.types, name).bl_parent_id == "KILN_PT_main"
               for name in ("KILN_PT_advanced", "KILN_PT_references", "KILN_PT_backend"))
    assert not any(item[0] == "operator" and item[1] == "kiln.setup_backend" for item in shown)
    refusal = kiln.scene_io.SceneError("switch to Object Mode first", "object_mode", add_cube())
    monkeypatch.setattr(kiln.operators, "REFUSAL", refusal)
    scene.use_references = True
    shown = panels_show(kiln)
    assert ("operator", "kiln.fix", "Switch to Object Mode") in shown
    assert ("operator", "kiln.find_references", None) in shown
    assert ("operator", "kiln.setup_backend", "Reinstall Backend…") in \
        drawn(kiln.properties.KilnPreferences.draw, PreferencesView, bpy.context)
    try:
        prefs.python_path = ""  # and nothing recorded (KILN_HOME is a fresh folder) nor in $KILN_PYTHON
        monkeypatch.delenv("KILN_PYTHON", raising=False)
        monkeypatch.setattr(kiln.backend_process, "POINTER_FILE", Path(os.environ["KILN_HOME"]) / "none")
        shown = panels_show(kiln)
        assert ("label", "No backend environment yet") in shown
        assert ("operator", "kiln.setup_backend", "Set Up Backend…") in shown
        prefs.backend_mode = "CONNECT"
        shown = drawn(kiln.properties.KilnPreferences.draw, PreferencesView, bpy.context)
        assert ("prop", "connection_file") in shown and ("prop", "python_path") not in shown
    finally:
        prefs.backend_mode, prefs.python_path = "START", BACKEND_PYTHON


def test_set_up_backend_installs_the_environment_or_says_why_not(kiln, scene, tmp_path, monkeypatch) -> None:
    """The Set Up Backend button runs the recipe ``build.py setup`` runs (backend/environment.py),
    with Blender's Python from the installed extension. Offline Blender refuses it; a failed install
    (here, no package index) says so with pip's last words and changes nothing; a finished one
    becomes the backend Python (completing the tests' own environment is quick and needs no index)."""
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences
    system = bpy.context.preferences.system
    online = system.use_online_access
    try:
        system.use_online_access = False
        with pytest.raises(RuntimeError, match="set to work offline"):
            bpy.ops.kiln.setup_backend()
        system.use_online_access = True
        monkeypatch.setenv("PIP_NO_INDEX", "1")
        monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder: nothing to install from
        with pytest.raises(RuntimeError, match=r"setting up the backend failed \(exit code 1\) at step 2/3"):
            bpy.ops.kiln.setup_backend()
        assert prefs.python_path == BACKEND_PYTHON
        backend_env = Path(BACKEND_PYTHON).parents[1]
        monkeypatch.setattr(kiln.operators, "setup_folder", lambda: backend_env)
        prefs.python_path = ""
        assert bpy.ops.kiln.setup_backend() == {"FINISHED"}
        assert Path(prefs.python_path) == Path(BACKEND_PYTHON)
        assert any(line.startswith("Requirement already satisfied: torch") for line in kiln.operators.SETUP.lines)
        pointer = Path(os.environ["KILN_HOME"]) / "backend-python"
        assert Path(pointer.read_text()) == Path(BACKEND_PYTHON)  # found with the preference empty too
    finally:
        system.use_online_access = online
        prefs.python_path = BACKEND_PYTHON


def test_jobs_can_go_to_a_backend_started_by_hand(kiln, scene, tmp_path) -> None:
    """Preferences > Backend: Connect to a Running Backend. Jobs go to the backend a person started
    (its models stay loaded across Blender sessions); Stop leaves it running; no backend, or a dead
    one, is a refusal that says how to start it."""
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences
    path = tmp_path / "backend.json"
    prefs.backend_mode, prefs.connection_file = "CONNECT", str(tmp_path / "none.json")
    obj = add_cube()
    select(obj)
    proc = None
    try:
        with pytest.raises(RuntimeError, match=r"none.json does not exist; start one with `python -m backend serve"):
            bpy.ops.kiln.texture_selected()
        proc, ready = start_standing_backend(path)
        prefs.connection_file = str(path)
        bpy.ops.kiln.texture_selected()
        assert kiln.operators.ACTIVE.succeeded and obj.material_slots[0].material.name.startswith("Kiln")
        status = kiln.session.MANAGER.status()
        assert status.startswith("connected") and f"port {ready['port']}" in status, status
        assert bpy.ops.kiln.copy_diagnostics() == {"FINISHED"}  # the clipboard is Blender's UI's: not here
        assert "its output is in its own terminal" in kiln.session.MANAGER.diagnostics()
        assert f"({path}; Python 3." in kiln.session.MANAGER.diagnostics()  # its versions, from its file
        kiln.session.MANAGER.stop()
        assert proc.poll() is None  # not Blender's to stop
        proc.kill()  # a crash leaves its file behind
        proc.communicate()
        with pytest.raises(RuntimeError, match=rf"nothing answers on port {ready['port']}.*serve --connection-file"):
            bpy.ops.kiln.texture_selected()
    finally:
        prefs.backend_mode = "START"
        kiln.session.MANAGER.stop()
        if proc is not None:
            proc.kill()
            proc.communicate()


def test_unsaved_file_gets_the_texture_packed_and_models_can_be_unloaded(kiln, scene) -> None:
    bpy.ops.wm.read_homefile(use_empty=True)  # never saved: no folder to write next to
    bpy.context.scene.kiln.prompt, bpy.context.scene.kiln.model = "a crate", "tiny"
    bpy.context.scene.kiln.texture_size, bpy.context.scene.kiln.steps = 512, 1
    obj = add_cube()
    select(obj)
    bpy.ops.kiln.texture_selected()
    image = bpy.data.images["Kiln Cube"]
    assert image.packed_file is not None and image.packed_file.size > 1000
    assert kiln.session.MANAGER.status().startswith("running on the CPU (slow")  # from its ready line
    report = kiln.session.MANAGER.diagnostics().splitlines()  # what a bug report needs first
    assert report[0].startswith(f"Kiln 0.1.0 in Blender {bpy.app.version_string}, ")
    assert f"({BACKEND_PYTHON}; Python 3." in report[1] and ", torch " in report[1] and ", diffusers " in report[1]
    backend_panel = next(p for p in kiln.panel.CLASSES if p.__name__ == "KILN_PT_backend")
    assert kiln.session.MANAGER.gpu_problem() == ""  # no NVIDIA card here, nothing to explain
    assert not [item for item in drawn(backend_panel.draw, None, bpy.context) if item[0] == "label"][1:]
    # A card the backend cannot use (its ready line says why: see test_server): the panel shows why.
    kiln.session.MANAGER.process.gpu_problem = "the NVIDIA GeForce GTX 1080 (compute capability 6.1) is not a card " \
        "torch 2.13.0 has kernels for, so jobs run on the CPU, far slower: install the CUDA 12.6 build"
    shown = " ".join(item[1] for item in drawn(backend_panel.draw, None, bpy.context) if item[0] == "label")
    assert "GTX 1080 (compute capability 6.1) is not a card" in shown and "install the CUDA 12.6 build" in shown
    assert "tiny" in kiln.session.MANAGER.unload_models()
    assert "none loaded" in kiln.session.MANAGER.unload_models()


def test_texture_pngs_read_back_exactly_and_never_share_a_name(kiln, tmp_path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 37, 4), dtype=np.uint8)  # odd sizes, rows bottom-up
    rgb = rgba.copy()
    rgb[..., 3] = 255
    for written, expected in ((rgba, rgba), (rgba[..., :3], rgb)):  # textures, and .blend assets' colour maps
        path = tmp_path / f"odd{written.shape[-1]}.png"
        path.write_bytes(kiln.texture_file.png_bytes(written))
        image = bpy.data.images.load(str(path))
        try:
            assert tuple(image.size) == (37, 5)
            assert np.array_equal((pixels(image) * 255 + 0.5).astype(np.uint8), expected.ravel())
        finally:
            bpy.data.images.remove(image)
    names = [kiln.texture_file.reserve(tmp_path / "kiln_textures", "Cube_seed0").name for _ in range(3)]
    assert names == ["Cube_seed0.png", "Cube_seed0_001.png", "Cube_seed0_002.png"]


def test_a_texture_folder_that_cannot_be_written_gets_the_texture_packed(kiln, scene, tmp_path) -> None:
    """A read-only share or a full disk: the result is packed, so saving the .blend keeps it,
    and the job still succeeds, saying where the texture is."""
    (tmp_path / "kiln_textures").write_text("a file where the folder would go")
    obj = add_cube()
    select(obj)
    assert bpy.ops.kiln.texture_selected() == {"FINISHED"}
    assert kiln.operators.ACTIVE.succeeded
    image = obj.material_slots[0].material.node_tree.nodes[kiln.scene_io.TEXTURE_NODE].image
    assert image.packed_file is not None and image.packed_file.size > 1000
    assert "packed into the .blend, as" in kiln.operators.ACTIVE.summary()
    assert "cannot be written" in kiln.operators.ACTIVE.summary()


def test_mesh_edited_during_the_job_fails_cleanly(kiln, scene) -> None:
    obj = add_cube(uvs=False)
    session = run_session(kiln, [obj], steps=50)
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.mesh.select_all(action="SELECT")
    bpy.ops.mesh.subdivide()
    bpy.ops.object.mode_set(mode="OBJECT")
    pump_until(session, lambda: session.finished)
    assert "was edited while Kiln worked" in session.failure
    assert [uv.name for uv in obj.data.uv_layers] == []
    assert obj.material_slots[0].material.name == "Artist Cube"


def test_opening_another_file_mid_job_ends_it_without_touching_the_new_file(kiln, scene) -> None:
    session = run_session(kiln, [add_cube()], steps=50)
    kiln.operators.ACTIVE = session  # as the panel's modal operator holds it
    pump_until(session, lambda: session.targets[0].live is not None)
    bpy.ops.wm.read_homefile(use_empty=True)
    assert session.finished and [t.status for t in session.targets] == ["cancelled"]
    settings = bpy.context.scene.kiln
    settings.prompt, settings.model, settings.texture_size, settings.steps = "a crate", "tiny", 512, 2
    same_name = add_cube()
    time.sleep(0.5)
    session.pump(timeout=0.5)  # frames still queued from the old file are not painted here
    assert same_name.name == "Cube" and same_name.material_slots[0].material.name == "Artist Cube"
    assert not any(name.startswith("Kiln") for name in bpy.data.images.keys())
    select(same_name)
    assert bpy.ops.kiln.texture_selected() == {"FINISHED"}  # nothing holds the panel as running
    assert kiln.operators.ACTIVE.targets[0].status == "finished"


def test_undo_mid_job_stops_it_and_keeps_the_undone_scene(kiln, scene) -> None:
    obj = add_cube()
    bpy.ops.ed.undo_push(message="before Kiln")
    session = run_session(kiln, [obj], steps=50)
    pump_until(session, lambda: session.targets[0].live is not None)
    bpy.ops.ed.undo_push(message="meanwhile")  # Ctrl+Z goes back to the step before the job
    bpy.ops.ed.undo()
    pump_until(session, lambda: session.finished)
    assert "undone" in session.failure and session.targets[0].status == "cancelled"
    assert not session.changed_scene
    assert [s.material.name for s in bpy.data.objects["Cube"].material_slots] == ["Artist Cube"]
    assert not any(name.startswith("Kiln") for name in bpy.data.images.keys())
    select(bpy.data.objects["Cube"])
    assert bpy.ops.kiln.texture_selected() == {"FINISHED"}


def test_a_bug_applying_a_result_ends_the_job_with_a_report(kiln, scene, monkeypatch) -> None:
    def broken(self, target, msg):
        raise TypeError("injected")
    monkeypatch.setattr(kiln.session.TextureSession, "_apply_texture", broken)
    session = run_session(kiln, [add_cube()], steps=50)
    pump_until(session, lambda: session.finished)
    assert "a bug in Kiln" in session.failure and "injected" in session.failure
    assert session.targets[0].status == "cancelled"
    # A bug while starting (on the starting thread) ends the job too, instead of leaving it starting.
    monkeypatch.setattr(kiln.session.BackendManager, "ensure", broken)
    session = run_session(kiln, [add_cube("Other")], steps=1)
    pump_until(session, lambda: session.finished, timeout=30)
    assert "stopped the job from starting (TypeError: injected)" in session.failure


def test_an_object_renamed_mid_job_still_gets_its_texture(kiln, scene) -> None:
    obj = add_cube(uvs=False)
    session = run_session(kiln, [obj], steps=2)
    obj.name = "Renamed"  # before its UVs and first texture arrive
    pump_until(session, lambda: session.finished)
    assert session.succeeded, session.summary()
    assert [uv.name for uv in obj.data.uv_layers] == ["KilnUV"]
    assert obj.material_slots[0].material.name == "Kiln Renamed"


def test_an_object_with_the_longest_name_blender_allows_gets_its_texture_file(kiln, scene) -> None:
    """Blender 5 takes names of up to 254 bytes: with the seed after it, the file name must still fit."""
    obj = add_cube()
    obj.name = "Ваза" * 64  # cut to Blender's limit: 127 letters in 5.0, 31 in 4.2
    select(obj)
    assert bpy.ops.kiln.texture_selected() == {"FINISHED"}
    image = obj.material_slots[0].material.node_tree.nodes[kiln.scene_io.TEXTURE_NODE].image
    saved = Path(bpy.path.abspath(image.filepath))
    assert image.packed_file is None and saved.is_file() and saved.name.startswith("ВазаВаза")
    assert saved.name.endswith("_seed0.png") and len(saved.name.encode()) <= 255


def test_deleting_the_object_mid_job_cancels_its_job(kiln, scene) -> None:
    obj = add_cube()
    session = run_session(kiln, [obj], steps=400)
    pump_until(session, lambda: session.targets[0].live is not None)
    bpy.data.objects.remove(obj)
    pump_until(session, lambda: session.finished, timeout=30)
    target = session.targets[0]
    assert (target.status, target.error) == ("cancelled", "its object was deleted")
    assert target.done < target.total


def test_edit_mode_before_the_uv_map_arrives_fails_cleanly(kiln, scene) -> None:
    obj = add_cube(uvs=False)
    select(obj)
    session = run_session(kiln, [obj], steps=50)
    bpy.ops.object.mode_set(mode="EDIT")
    pump_until(session, lambda: session.finished)
    bpy.ops.object.mode_set(mode="OBJECT")
    assert "went into Edit Mode" in session.failure
    assert [uv.name for uv in obj.data.uv_layers] == []
    assert obj.material_slots[0].material.name == "Artist Cube"


def link_artist_image(obj) -> np.ndarray:
    """Wire the artist's image into Base Color and paint it with a gradient; returns its pixels."""
    mat = obj.material_slots[0].material
    nodes = mat.node_tree.nodes
    tex = next(n for n in nodes if n.type == "TEX_IMAGE")
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    px = np.linspace(0, 1, 8 * 8 * 4, dtype=np.float32)
    px[3::4] = 1.0
    tex.image.pixels.foreach_set(px)
    return px


def test_refine_sends_the_existing_texture_and_keeps_its_uv_map(kiln, scene) -> None:
    obj = add_cube()
    obj.data.uv_layers.new(name="Second")  # the image is read through the render UV map, not this one
    obj.data.uv_layers.active = obj.data.uv_layers["Second"]
    px = link_artist_image(obj)
    obj.material_slots[0].material.node_tree.nodes["Material Output"].target = "CYCLES"  # no output for "all"
    scene.refine, scene.strength = True, 0.2
    session = run_session(kiln, [obj], steps=1)
    sent = session.targets[0].arrays["init_texture"]
    assert sent.shape == (8, 8, 4)
    assert np.array_equal(np.frombuffer(sent.data, np.uint8), (px * 255 + 0.5).astype(np.uint8))
    assert session.targets[0].fields["uv_map"] == "UVMap" and session.job_fields["strength"] == pytest.approx(0.2)
    assert "slot_sources" not in session.targets[0].fields  # one material: its image is the whole story
    pump_until(session, lambda: session.finished)
    assert session.succeeded, session.summary()
    uv_node = next(n for n in obj.material_slots[0].material.node_tree.nodes if n.type == "UVMAP")
    assert uv_node.uv_map == "UVMap"
    kept = obj.material_slots[0].material.node_tree.nodes  # a copy of the artist's, not a plain one
    assert any(n.type == "TEX_IMAGE" and n.name != kiln.scene_io.TEXTURE_NODE for n in kept)
    assert bpy.data.materials["Artist Cube"].use_fake_user  # the original stays


def test_only_selected_faces_repaints_them_and_keeps_the_others_texture(kiln, scene) -> None:
    """Refine with Only Selected Faces: the cube's top face, selected in Edit Mode and subdivided
    by a modifier that carries the selection, is repainted, and every other face keeps its
    texels, at the image's own size rather than the larger one asked for (with a note). With no
    face selected, or a modifier that drops the selection, the job says so."""
    obj = add_cube()
    obj.modifiers.new("Rounded", "SUBSURF")
    link_artist_image(obj)
    artist = obj.material_slots[0].material
    image = next(n for n in artist.node_tree.nodes if n.type == "TEX_IMAGE").image
    image.scale(512, 512)
    scene.texture_size = 1024
    before = pixels(image).reshape(512, 512, 4)
    select(obj)
    bpy.ops.object.mode_set(mode="EDIT")  # where artists pick faces; the job leaves it to read them
    edited = bmesh.from_edit_mesh(obj.data)
    for face in edited.faces:
        face.select_set(face.normal.z > 0.5)
    bmesh.update_edit_mesh(obj.data)
    scene.refine, scene.strength, scene.selected_faces = True, 1.0, True
    bpy.ops.ed.undo_push(message="picked the faces")
    assert bpy.ops.kiln.texture_selected("EXEC_DEFAULT", True) == {"FINISHED"}
    notes = " ".join(kiln.operators.ACTIVE.notes)
    assert obj.mode == "OBJECT" and "left Edit Mode" in notes and "image's own 512² rather than the 1024²" in notes
    target = kiln.operators.ACTIVE.targets[0]
    assert target.status == "finished", kiln.operators.ACTIVE.summary()
    paint = np.frombuffer(target.arrays[kiln.backend.protocol.PAINT_TRIANGLES].data, np.uint8)
    assert len(paint) == 48 and paint.sum() == 8  # the top face's four quads, of 24
    after = obj.material_slots[0].material.node_tree.nodes[kiln.scene_io.TEXTURE_NODE].image
    after = pixels(after).reshape(512, 512, 4)
    uv = np.empty(len(obj.data.loops) * 2, np.float32)
    obj.data.uv_layers["UVMap"].data.foreach_get("uv", uv)
    for face in obj.data.polygons:
        corners = uv.reshape(-1, 2)[list(face.loop_indices)]
        lo, hi = (np.floor(corners.min(0) * 512).astype(int) + 4, np.ceil(corners.max(0) * 512).astype(int) - 4)
        inside = (slice(lo[1], hi[1]), slice(lo[0], hi[0]), slice(0, 3))  # the face's texels, off its edges
        moved = np.abs(after[inside] - before[inside]).mean()
        if face.select:
            assert moved > 0.05, moved
        else:
            assert moved < 1 / 255, (face.index, moved)
    assert artist.use_fake_user  # the artist's material survives, as with any refine
    blank = kiln.session.target_for(obj, refine=False, selected_faces=True)  # greyed out: a blank start repaints all
    assert kiln.backend.protocol.PAINT_TRIANGLES not in blank.arrays

    bpy.ops.ed.undo()  # back to Edit Mode, the faces picked, and the artist's material
    obj = bpy.data.objects["Cube"]
    assert obj.mode == "EDIT" and obj.material_slots[0].material.name == "Artist Cube"
    bpy.ops.mesh.select_all(action="DESELECT")
    with pytest.raises(RuntimeError, match="no faces of 'Cube' are selected: select the faces to repaint"):
        bpy.ops.kiln.texture_selected("EXEC_DEFAULT", True)
    assert obj.mode == "EDIT"  # a refusal leaves the artist where they were
    bpy.ops.object.mode_set(mode="OBJECT")
    obj.data.polygons[0].select = True
    obj.modifiers.new("Fewer", "DECIMATE").ratio = 0.5
    with pytest.raises(RuntimeError, match=r"modifiers \(Rounded, Fewer\) drop its face selection"):
        bpy.ops.kiln.texture_selected("EXEC_DEFAULT", True)
    obj.modifiers.remove(obj.modifiers["Fewer"])
    bottom = obj.vertex_groups.new(name="Bottom")
    bottom.add([v.index for v in obj.data.vertices if v.co.z < 0], 1.0, "REPLACE")
    obj.modifiers.new("Bottom only", "MASK").vertex_group = "Bottom"
    obj.data.polygons[0].select = False
    next(f for f in obj.data.polygons if f.normal.z > 0.5).select = True  # the top, which the mask removes
    with pytest.raises(RuntimeError, match=r"\(Rounded, Bottom only\) leave none of its selected faces"):
        bpy.ops.kiln.texture_selected("EXEC_DEFAULT", True)


def test_refining_several_materials_sends_each_slots_image_or_colour(kiln, scene) -> None:
    """A cube whose top faces have a second material with its own image, read through a second UV
    map, and a third slot with a flat colour: the job gets every slot's source and each triangle's
    slot, and finishes. Each slot then shows a copy of its material with the new texture on Base
    Color and the rest of its shading (roughness, a normal map) as it was."""
    obj = add_cube()
    link_artist_image(obj)
    artist = obj.material_slots[0].material
    bsdf = next(n for n in artist.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    bsdf.inputs["Roughness"].default_value = 0.9
    bump = artist.node_tree.nodes.new("ShaderNodeNormalMap")
    artist.node_tree.links.new(bump.outputs["Normal"], bsdf.inputs["Normal"])
    second = add_cube("Second")
    link_artist_image(second)
    obj.data.materials.append(second.material_slots[0].material)
    flat = bpy.data.materials.new("Flat")
    if not flat.node_tree:
        flat.use_nodes = True
    next(n for n in flat.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"].default_value = \
        (1.0, 0.0, 0.0, 1.0)
    obj.data.materials.append(flat)
    obj.data.materials.append(None)  # an empty slot, whose faces show nothing of their own
    bpy.data.objects.remove(second)
    obj.data.uv_layers.new(name="Other")
    material = obj.material_slots[1].material
    uv_node = material.node_tree.nodes.new("ShaderNodeUVMap")
    uv_node.uv_map = "Other"
    tex = next(n for n in material.node_tree.nodes if n.type == "TEX_IMAGE")
    material.node_tree.links.new(uv_node.outputs["UV"], tex.inputs["Vector"])
    for face in obj.data.polygons:
        face.material_index = 1 if face.normal.z > 0.5 else 2 if face.normal.z < -0.5 else 0
    select(obj)
    scene.refine = True
    session = run_session(kiln, [obj], steps=1)
    target = session.targets[0]
    first, other, colour, empty = target.fields["slot_sources"]
    assert empty is None
    assert first == {"texture": "init_texture", "uvs": "loop_uvs"}  # the texture's own image and map, not sent again
    assert other == {"texture": "slot_texture_1", "uvs": "slot_uvs_1"} and colour["color"] == pytest.approx([1, 0, 0])
    assert target.arrays["slot_texture_1"].shape == (8, 8, 4) and target.arrays["slot_uvs_1"].shape == (24, 2)
    slots = np.frombuffer(target.arrays["triangle_slots"].data, np.int32)
    assert sorted(np.bincount(slots)) == [2, 2, 8]  # two triangles on top, two below, eight around
    pump_until(session, lambda: session.finished)
    assert session.succeeded, session.summary()
    shown = [slot.material for slot in obj.material_slots]
    assert [m.name for m in shown] == ["Kiln Cube (Artist Cube)", "Kiln Cube (Artist Second)", "Kiln Cube (Flat)",
                                       "Kiln Cube"]
    for material in shown:
        base = next(n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"]
        assert base.links[0].from_node.name == kiln.scene_io.TEXTURE_NODE
        assert base.links[0].from_node.image == target.live.image
    kept = next(n for n in shown[0].node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    assert kept.inputs["Roughness"].default_value == pytest.approx(0.9) and kept.inputs["Normal"].links
    assert bsdf.inputs["Base Color"].links[0].from_node.image.name == "Artist texture Cube"  # the artist's, untouched


def studio_shader(name: str, image=None):
    """A node group as studios share shaders: a Principled BSDF whose Base Color comes from the
    group's Albedo input, or with ``image``, from an image inside the group."""
    group = bpy.data.node_groups.new(name, "ShaderNodeTree")
    group.interface.new_socket("Albedo", in_out="INPUT", socket_type="NodeSocketColor")
    group.interface.new_socket("Rough", in_out="INPUT", socket_type="NodeSocketFloat")
    group.interface.new_socket("Shader", in_out="OUTPUT", socket_type="NodeSocketShader")
    nodes, links = group.nodes, group.links
    inputs, outputs, bsdf = (nodes.new(kind) for kind in ("NodeGroupInput", "NodeGroupOutput",
                                                          "ShaderNodeBsdfPrincipled"))
    links.new(inputs.outputs["Albedo"], bsdf.inputs["Base Color"])
    links.new(inputs.outputs["Rough"], bsdf.inputs["Roughness"])
    links.new(bsdf.outputs["BSDF"], outputs.inputs["Shader"])
    if image is not None:
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = image
        links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    return group


def test_a_principled_bsdf_inside_a_node_group_is_read_and_painted_through_the_groups_input(kiln, scene) -> None:
    """The group's Albedo input is what Base Color shows: refine reads the image wired to it, and
    the copy shows the new texture there, the group itself untouched. A group that paints Base
    Color inside itself cannot be rewired without changing every material using it: plain material;
    and refine bakes the colours it shows, the group put back as it was."""
    obj = add_cube()
    px = link_artist_image(obj)
    studio = obj.material_slots[0].material
    nodes, links = studio.node_tree.nodes, studio.node_tree.links
    shader = nodes.new("ShaderNodeGroup")
    shader.node_tree = studio_shader("Studio Shader")
    shader.inputs["Rough"].default_value = 0.7
    links.new(next(n for n in nodes if n.type == "TEX_IMAGE").outputs["Color"], shader.inputs["Albedo"])
    links.new(shader.outputs["Shader"], nodes["Material Output"].inputs["Surface"])  # the plain BSDF: unconnected
    target = kiln.session.target_for(obj, refine=True)
    assert np.array_equal(np.frombuffer(target.arrays["init_texture"].data, np.uint8),
                          (px * 255 + 0.5).astype(np.uint8)) and not target.notes
    baked = bpy.data.materials.new("Baked")
    if not baked.node_tree:
        baked.use_nodes = True
    inner = baked.node_tree.nodes.new("ShaderNodeGroup")
    inner.node_tree = studio_shader("Baked Shader", bpy.data.images.new("Baked texture", 8, 8))
    baked.node_tree.links.new(inner.outputs["Shader"], baked.node_tree.nodes["Material Output"].inputs["Surface"])
    obj.data.materials.append(baked)
    for face in obj.data.polygons:
        face.material_index = 1 if face.normal.z > 0.5 else 0
    select(obj)
    scene.refine = True
    session = run_session(kiln, [obj], steps=1)
    assert "through the shader 'Group' on 'Baked', so Kiln baked" in session.notes[0]
    assert len(inner.node_tree.nodes) == 4  # the bake's stand-ins are gone from the group, its wiring back
    inner_bsdf = next(n for n in inner.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    assert [link.to_node.type for link in inner_bsdf.outputs["BSDF"].links] == ["GROUP_OUTPUT"]
    pump_until(session, lambda: session.finished)
    assert session.succeeded, session.summary()
    copy, plain = (slot.material for slot in obj.material_slots)
    group = next(n for n in copy.node_tree.nodes if n.type == "GROUP")
    assert copy.name == "Kiln Cube (Artist Cube)" and group.inputs["Rough"].default_value == pytest.approx(0.7)
    assert group.inputs["Albedo"].links[0].from_node.name == kiln.scene_io.TEXTURE_NODE
    assert group.node_tree.name == "Studio Shader" and len(group.node_tree.nodes) == 3  # shared: untouched
    assert not any(n.type == "GROUP" for n in plain.node_tree.nodes)
    assert kiln.scene_io.TEXTURE_NODE in plain.node_tree.nodes
    assert shader.inputs["Albedo"].links[0].from_node.image.name == "Artist texture Cube"  # the artist's, untouched


def test_refining_a_udim_image_starts_each_tile_from_its_own(kiln, scene, tmp_path) -> None:
    """Blender's Python reads a UDIM image's first tile only: the faces in its other tiles get
    theirs, read from its files, then from its packed data once the files are gone."""
    obj, _ = udim_cube("Tiled")
    for number, colour in ((1001, (1, 0, 0, 1)), (1002, (0, 0, 1, 1))):
        tile = bpy.data.images.new(f"tile {number}", 8, 8)
        tile.pixels.foreach_set(np.tile(np.float32(colour), 64))
        tile.filepath_raw, tile.file_format = str(tmp_path / f"paint.{number}.png"), "PNG"
        tile.save()
    image = bpy.data.images.load(str(tmp_path / "paint.1001.png"))
    image.source = "TILED"
    assert [t.number for t in image.tiles] == [1001, 1002]
    link_artist_image(obj)
    next(n for n in obj.material_slots[0].material.node_tree.nodes if n.type == "TEX_IMAGE").image = image
    artist = obj.material_slots[0].material
    select(obj)
    scene.refine = True
    for packed in (False, True):
        if packed:
            image.pack()
            for number in (1001, 1002):
                (tmp_path / f"paint.{number}.png").unlink()
            obj.material_slots[0].material = artist  # in place of the first job's result
        session = run_session(kiln, [obj], steps=1)
        target = session.targets[0]
        assert target.fields["slot_sources"] == [{"texture": "init_texture", "uvs": "loop_uvs"},
                                                 {"texture": "slot_texture_1", "uvs": "loop_uvs"}]
        first = np.frombuffer(target.arrays["init_texture"].data, np.uint8).reshape(-1, 4)
        second = np.frombuffer(target.arrays["slot_texture_1"].data, np.uint8).reshape(-1, 4)
        assert (first == [255, 0, 0, 255]).all() and (second == [0, 0, 255, 255]).all()
        slots = np.frombuffer(target.arrays["triangle_slots"].data, np.int32)
        assert list(np.bincount(slots)) == [32, 16]  # the subdivided top and bottom lie in tile 1002
        pump_until(session, lambda: session.finished)
        assert session.succeeded, session.summary()
    assert [layer.name for layer in obj.data.uv_layers] == ["UVMap", "KilnUDIM"]
    # A second material on the top faces showing the same image: its tile goes over the wire once.
    obj.material_slots[0].material = artist
    obj.data.materials.append(artist.copy())
    for face in obj.data.polygons:
        face.material_index = 1 if face.normal.z > 0.5 else 0
    session = run_session(kiln, [obj], steps=1)
    target = session.targets[0]
    tile = {"texture": "slot_texture_2", "uvs": "loop_uvs"}
    assert target.fields["slot_sources"] == [{"texture": "init_texture", "uvs": "loop_uvs"}] * 2 + [tile] * 2
    assert [name for name in target.arrays if name.startswith("slot_texture")] == ["slot_texture_2"]
    assert list(np.bincount(np.frombuffer(target.arrays["triangle_slots"].data, np.int32))) == [32, 0, 8, 8]
    pump_until(session, lambda: session.finished)
    assert session.succeeded, session.summary()


def test_textures_over_the_largest_size_are_sent_scaled_down(kiln, scene) -> None:
    image = bpy.data.images.new("8K strip", 8192, 16)  # an 8K map would overflow one message
    px = np.zeros((16, 8192, 4), np.float32)
    px[..., 0], px[..., 3] = np.linspace(0, 1, 8192), 1.0
    image.pixels.foreach_set(px.ravel())
    rgba = kiln.materials.image_rgba8(image)
    assert rgba.shape == (8, 4096, 4)  # aspect kept
    assert np.abs(rgba[4, :, 0].astype(float) - np.linspace(0, 255, 4096)).max() < 1
    hdr = bpy.data.images.new("linear", 5, 1, float_buffer=True)  # linear values, sent as sRGB bytes
    hdr.pixels.foreach_set(np.array([[v, v, v, 1.0] for v in (0.0, 0.0031308, 0.2159, 0.5, 4.0)], np.float32).ravel())
    assert kiln.materials.image_rgba8(hdr)[0, :, 0].tolist() == [0, 10, 128, 188, 255]


def test_refine_without_a_texture_says_why(kiln, scene) -> None:
    """No image in the Image Texture on Base Color, an image whose file is missing, one read through
    a UV map the mesh lacks: each refusal names its own cause and fix, and the material stays."""
    obj = add_cube()
    select(obj)
    scene.refine = True
    link_artist_image(obj)
    image_node = next(n for n in obj.material_slots[0].material.node_tree.nodes if n.type == "TEX_IMAGE")
    image_node.image = None
    with pytest.raises(RuntimeError, match="'Cube' has nothing to refine: the Image Texture on 'Artist Cube''s Base "
                                           "Color holds no image: pick one in it"):
        bpy.ops.kiln.texture_selected()
    image_node.image = bpy.data.images["Artist texture Cube"]
    image = next(n for n in obj.material_slots[0].material.node_tree.nodes if n.type == "TEX_IMAGE").image
    image.source, image.filepath = "FILE", "//gone/oak.png"
    image.reload()
    with pytest.raises(RuntimeError, match=r"shows 'Artist texture Cube', which has no pixels \(its file "
                                           r"'//gone/oak.png' is missing or unreadable\): find it"):
        bpy.ops.kiln.texture_selected()
    image.source = "GENERATED"
    tree = obj.material_slots[0].material.node_tree
    reader = tree.nodes.new("ShaderNodeUVMap")
    reader.uv_map = "Painted"  # a map since renamed or removed
    tree.links.new(reader.outputs["UV"], next(n for n in tree.nodes if n.type == "TEX_IMAGE").inputs["Vector"])
    with pytest.raises(RuntimeError, match="reads 'Artist texture Cube' through the UV map 'Painted', which 'Cube' "
                                           "lacks: pick one of its maps"):
        bpy.ops.kiln.texture_selected()
    assert obj.material_slots[0].material.name == "Artist Cube"


def test_a_base_color_image_multiplied_by_a_colour_is_read_as_the_material_shows_it(kiln, scene) -> None:
    """glTF's importer multiplies a Base Color texture by its factor with a Mix node: a refine job
    starts from the image as tinted (the texture replaces the chain); a chain Kiln cannot work out
    is refused, naming its node."""
    obj = add_cube()
    px = link_artist_image(obj).reshape(8, 8, 4)
    tree = obj.material_slots[0].material.node_tree
    image, bsdf = (next(n for n in tree.nodes if n.type == kind) for kind in ("TEX_IMAGE", "BSDF_PRINCIPLED"))
    tint = tree.nodes.new("ShaderNodeMix")
    tint.data_type, tint.blend_type = "RGBA", "MULTIPLY"
    tint.inputs["Factor"].default_value = 1.0
    colour = next(i for i in tint.inputs if i.identifier == "B_Color")
    colour.default_value = (0.5, 0.8, 1.0, 1.0)
    tree.links.new(image.outputs["Color"], next(i for i in tint.inputs if i.identifier == "A_Color"))
    tree.links.new(next(o for o in tint.outputs if o.identifier == "Result_Color"), bsdf.inputs["Base Color"])
    sent = np.frombuffer(kiln.session.target_for(obj, refine=True).arrays["init_texture"].data, np.uint8)
    sent = sent.reshape(8, 8, 4)[..., :3] / 255

    def linear(c):
        return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    shown = linear(np.round(px[..., :3] * 255) / 255) * [0.5, 0.8, 1.0]
    shown = np.where(shown <= 0.0031308, shown * 12.92, 1.055 * shown ** (1 / 2.4) - 0.055)
    assert np.abs(sent - shown).max() <= 1 / 255 + 1e-6
    assert sent[..., 0].mean() < px[..., 0].mean() - 0.05  # darker than the untinted image


def test_refine_bakes_the_colours_kiln_cannot_read_from_an_image(kiln, scene, tmp_path) -> None:
    """A colour through a Hue/Saturation node, a procedural texture, a flat colour: Cycles bakes
    what each slot shows onto the render UV map, the job refines from that and says so, and the
    scene is left as it was (engine, selection, active nodes, no extra images). A UV map past the
    unit square cannot be baked into one image: refused with the fix."""
    obj = add_cube()
    other = add_cube("Other")
    tree = obj.material_slots[0].material.node_tree
    bsdf = next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED")
    colour = tree.nodes.new("ShaderNodeRGB")
    colour.outputs[0].default_value = (0.8, 0.2, 0.2, 1.0)
    hue = tree.nodes.new("ShaderNodeHueSaturation")
    hue.name = "Greyer"
    hue.inputs["Saturation"].default_value = 0.0
    tree.links.new(colour.outputs[0], hue.inputs["Color"])
    tree.links.new(hue.outputs["Color"], bsdf.inputs["Base Color"])
    flat = bpy.data.materials.new("Flat")
    if not flat.node_tree:
        flat.use_nodes = True
    metal = next(n for n in flat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    metal.inputs["Base Color"].default_value, metal.inputs["Metallic"].default_value = (0.0, 0.0, 1.0, 1.0), 1.0
    obj.data.materials.append(flat)
    for face in obj.data.polygons:
        face.material_index = 1 if face.normal.z > 0.5 else 0
    select(other, obj)
    tree.nodes.active = bsdf
    engine, nodes_before, images_before = bpy.context.scene.render.engine, len(tree.nodes), set(bpy.data.images)
    target = kiln.session.target_for(obj, refine=True, size=256)
    assert target.notes and "through the node 'Greyer' on 'Artist Cube', so Kiln baked" in target.notes[0]
    sent = np.frombuffer(target.arrays["init_texture"].data, np.uint8).reshape(256, 256, 4)
    found = {tuple(c) for c in np.unique(sent.reshape(-1, 4)[:, :3], axis=0)}
    grey = next(c for c in found if c[0] > 100 and c[0] == c[1] == c[2])  # the red, greyed by the node
    assert {grey, (0, 0, 255)} <= found, found  # and the top's flat blue, though a metal
    assert bpy.context.scene.render.engine == engine and len(tree.nodes) == nodes_before
    assert tree.nodes.active == bsdf and set(bpy.data.images) == images_before
    assert {o.name for o in bpy.context.selected_objects} == {"Cube", "Other"}
    assert bpy.context.view_layer.objects.active == other
    painted = other.data.color_attributes.new("Paint", "BYTE_COLOR", "CORNER")  # vertex colours
    painted.data.foreach_set("color", np.tile([0.0, 1.0, 0.0, 1.0], len(other.data.loops)).astype(np.float32))
    other_tree = other.material_slots[0].material.node_tree
    attribute = other_tree.nodes.new("ShaderNodeVertexColor")
    attribute.layer_name = "Paint"
    other_tree.links.new(attribute.outputs["Color"],
                         next(n for n in other_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"])
    sent = np.frombuffer(kiln.session.target_for(other, refine=True, size=64).arrays["init_texture"].data, np.uint8)
    assert (0, 255, 0) in {tuple(c) for c in sent.reshape(-1, 4)[:, :3]}
    tiled = add_cube("Tiled")  # an image tiled by a Mapping node: read through the UVs it would be wrong
    link_artist_image(tiled)
    tiled_tree = tiled.material_slots[0].material.node_tree
    mapping = tiled_tree.nodes.new("ShaderNodeMapping")
    mapping.inputs["Scale"].default_value = (4.0, 4.0, 1.0)
    tiled_tree.links.new(tiled_tree.nodes.new("ShaderNodeTexCoord").outputs["UV"], mapping.inputs["Vector"])
    tiled_tree.links.new(mapping.outputs["Vector"], next(n for n in tiled_tree.nodes if n.type == "TEX_IMAGE")
                         .inputs["Vector"])
    target = kiln.session.target_for(tiled, refine=True, size=64)
    assert target.arrays["init_texture"].shape == (64, 64, 4) and "placed by other than a UV map" in target.notes[0]
    shared = studio_shader("Shared Stone")  # a node group from a library: baked through, left as it was
    flat_linked = bpy.data.materials.new("Library flat")
    for block in (shared, flat_linked):
        block.use_fake_user = True
    bpy.data.libraries.write(str(tmp_path / "shaders.blend"), {shared, flat_linked}, fake_user=True)
    bpy.data.node_groups.remove(shared)
    bpy.data.materials.remove(flat_linked)
    with bpy.data.libraries.load(str(tmp_path / "shaders.blend"), link=True) as (_, linked):
        linked.node_groups, linked.materials = ["Shared Stone"], ["Library flat"]
    stone = add_cube("Stone")
    stone_tree = stone.material_slots[0].material.node_tree
    group = stone_tree.nodes.new("ShaderNodeGroup")
    group.node_tree = linked.node_groups[0]
    stone_tree.links.new(stone_tree.nodes.new("ShaderNodeTexChecker").outputs["Color"], group.inputs["Albedo"])
    stone_tree.links.new(group.outputs["Shader"], stone_tree.nodes["Material Output"].inputs["Surface"])
    sent = np.frombuffer(kiln.session.target_for(stone, refine=True, size=64).arrays["init_texture"].data, np.uint8)
    assert len(np.unique(sent.reshape(-1, 4), axis=0)) >= 3 and len(group.node_tree.nodes) == 3  # checks, gaps
    stone.material_slots[0].material = linked.materials[0]  # a linked material would bake nothing
    with pytest.raises(kiln.scene_io.SceneError, match="'Library flat' is linked from another file: make it local"):
        kiln.session.target_for(stone, refine=True, size=64)
    bare = add_cube("Bare", artist_material=False)
    with pytest.raises(kiln.scene_io.SceneError, match="'Bare' has no material, so it shows no colours to start "
                                                       "from: give it one, or untick Refine Existing Texture"):
        kiln.session.target_for(bare, refine=True, size=64)
    bare.data.materials.append(None)
    with pytest.raises(kiln.scene_io.SceneError, match="has an empty material slot"):
        kiln.session.target_for(bare, refine=True, size=64)
    uv = obj.data.uv_layers.active.data[0].uv
    uv.x += 1.0  # one corner in the next UV tile
    with pytest.raises(kiln.scene_io.SceneError, match="reaches past the unit square .* wire an Image Texture"):
        kiln.session.target_for(obj, refine=True, size=256)
    uv.x -= 1.0

    noise = tree.nodes.new("ShaderNodeTexNoise")  # procedural: every texel its own colour
    tree.links.new(noise.outputs["Color"], bsdf.inputs["Base Color"])
    select(obj)
    scene.refine = True
    assert bpy.ops.kiln.texture_selected() == {"FINISHED"}
    session = kiln.operators.ACTIVE
    assert session.succeeded and any("through the node 'Noise Texture'" in note for note in session.notes)
    assert bpy.context.scene.render.engine == engine


def test_generate_object_builds_a_textured_object_at_the_cursor_in_one_undo_step(kiln, scene) -> None:
    """From Edit Mode too: the job leaves it, and undo goes back to it. The object lands in the
    active collection, as Blender's Add menu puts objects, unless that one would hide it."""
    props = bpy.data.collections.new("Props")
    bpy.context.scene.collection.children.link(props)
    bpy.context.view_layer.active_layer_collection = bpy.context.view_layer.layer_collection.children["Props"]
    select(add_cube("Edited"))
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.context.scene.cursor.location = (2.0, -1.0, 0.5)
    scene.prompt, scene.steps, scene.controlnet = "a red chair", 1, "ignored/for-generation"
    before = set(bpy.data.objects.keys())
    previews = []
    original = kiln.scene_io.PointPreview.update

    def spy(self, positions, colors, sizes):
        original(self, positions, colors, sizes)
        previews.append((self.obj.name, len(self.obj.data.vertices), tuple(self.obj.location)))
        if len(previews) == 1:  # the artist moves the preview and turns it: the object lands there
            self.obj.location.x += 1
            self.obj.rotation_euler.z = 0.5
    kiln.scene_io.PointPreview.update = spy
    try:
        bpy.ops.ed.undo_push(message="before Kiln")
        assert bpy.ops.kiln.generate_object("EXEC_DEFAULT", True) == {"FINISHED"}
    finally:
        kiln.scene_io.PointPreview.update = original
    target = kiln.operators.ACTIVE.targets[0]
    assert target.status == "finished", kiln.operators.ACTIVE.summary()
    assert bpy.data.objects["Edited"].mode == "OBJECT"
    assert any("left Edit Mode" in note for note in kiln.operators.ACTIVE.notes)
    assert previews and previews[0][1] > 0 and previews[0][2] == pytest.approx((2.0, -1.0, 0.5))
    added = set(bpy.data.objects.keys()) - before
    assert added == {"Kiln red chair"}, added  # the preview is gone, only the object remains
    obj = bpy.data.objects["Kiln red chair"]
    assert tuple(obj.location) == pytest.approx((3.0, -1.0, 0.5)) and obj.select_get()
    assert tuple(obj.rotation_euler) == pytest.approx((0, 0, 0.5))
    assert list(obj.users_collection) == [props]
    layer = bpy.context.view_layer.active_layer_collection
    assert layer.collection == props
    layer.hide_viewport = True  # a new object in Props would not show: it goes to the scene's collection
    hidden = bpy.data.objects.new("Elsewhere", None)
    kiln.scene_io._link_new(hidden)
    assert list(hidden.users_collection) == [bpy.context.scene.collection]
    bpy.data.objects.remove(hidden)
    layer.hide_viewport = False
    assert kiln.scene_io.PREVIOUS_MATERIALS not in obj  # nothing to restore on an object Kiln made
    assert len(obj.data.polygons) > 100 and [uv.name for uv in obj.data.uv_layers] == ["KilnUV"]
    assert not kiln.scene_io.outdated_unwrap(obj) and kiln.scene_io.UNWRAPPED_FACES in obj.data  # edited: anew
    assert not any(m.name.endswith("preview") for m in bpy.data.materials)
    tex = obj.material_slots[0].material.node_tree.nodes[kiln.scene_io.TEXTURE_NODE]
    assert tex.image.size[0] == 512 and pixels(tex.image).reshape(512, 512, 4)[..., :3].std() > 0.01
    assert Path(bpy.path.abspath(tex.image.filepath)).is_file()

    bpy.ops.ed.undo()
    assert "Kiln red chair" not in bpy.data.objects
    assert set(bpy.data.objects.keys()) == before and bpy.data.objects["Edited"].mode == "EDIT"



def test_generation_cancelled_during_the_preview_leaves_no_trace(kiln, scene, tmp_path) -> None:
    """Nor does a save during the preview: the file saved mid-preview (a habitual Ctrl+S) came back,
    job gone, with a cloud of tetrahedra named "... preview" in it."""
    before = set(bpy.data.objects.keys())
    fields = kiln.session.read_settings(bpy.context.scene.kiln)
    fields["steps"] = 200
    session = kiln.operators.ACTIVE = kiln.session.GenerateSession(
        fields, kiln.backend_process.BackendChoice(BACKEND_PYTHON), (0.0, 0.0, 0.0))
    session.start()
    target = session.targets[0]
    pump_until(session, lambda: target.preview is not None)
    shown = len(target.preview.obj.data.vertices)
    target.preview.obj.location = (0, 2, 0)  # moved by the artist
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "mid-preview.blend"), copy=True)
    assert len(target.preview.obj.data.vertices) == shown > 0  # still shown after the save, where it was
    assert tuple(target.preview.obj.location) == (0, 2, 0)
    with bpy.data.libraries.load(str(tmp_path / "mid-preview.blend")) as (saved, _):
        assert saved.objects == [] and saved.meshes == [] and saved.materials == []
    session.cancel()
    pump_until(session, lambda: session.finished)
    assert target.status == "cancelled" and not session.changed_scene
    assert set(bpy.data.objects.keys()) == before
    assert not any("preview" in m.name for m in bpy.data.meshes)


def test_a_job_behind_another_clients_says_it_waits_its_turn(kiln, scene, capsys) -> None:
    """A backend shared with batch runs or another Blender runs one job at a time: the panel said
    "queued 0/1" for as long as the other job took, and a batch log "Starting backend…"."""
    fields = kiln.session.read_settings(bpy.context.scene.kiln)
    fields["steps"] = 200
    other = kiln.session.GenerateSession(fields, kiln.backend_process.BackendChoice(BACKEND_PYTHON), (0.0, 0.0, 0.0))
    other.start()
    pump_until(other, lambda: other.targets[0].done > 0)
    select(add_cube())
    threading.Timer(0.5, other.cancel).start()  # from the other Blender, while this one waits on its job
    capsys.readouterr()
    bpy.ops.kiln.texture_selected()
    log = capsys.readouterr().out  # the panel's progress text, a line per tenth and per phase
    pump_until(other, lambda: other.finished)
    assert kiln.operators.ACTIVE.succeeded, kiln.operators.ACTIVE.summary()
    assert "Kiln 0% · Cube: waiting for 1 job ahead of it\n" in log and "Kiln 0% · Cube: denoising views 0/" in log, log


def test_a_preview_a_file_kept_goes_when_the_file_is_opened(kiln, tmp_path) -> None:
    """A file written without the save handlers (Blender's autosave, after a crash) can hold a
    preview whose job is gone."""
    bpy.ops.wm.read_homefile(use_empty=True)
    preview = kiln.scene_io.PointPreview("Kiln stool", (0.0, 0.0, 0.0))
    preview.update(np.zeros((3, 3), np.float32), np.full((3, 3), 200, np.uint8), np.full(3, 0.01, np.float32))
    bpy.data.libraries.write(str(tmp_path / "autosave.blend"), {preview.obj})
    preview.remove()
    del preview
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "autosave.blend"))
    assert (len(bpy.data.objects), len(bpy.data.meshes), len(bpy.data.materials)) == (0, 0, 0)


def test_batch_generate_script(kiln, tmp_path) -> None:
    blend = tmp_path / "gen.blend"
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.context.scene.cursor.location = (0.0, 1.0, 0.0)
    bpy.ops.wm.save_as_mainfile(filepath=str(blend), copy=True)  # a copy: this Blender can read it back below
    done = run_example("batch_generate.py", blend, "--prompt", "a stool", "--prompt", "a lamp", "--model", "tiny",
                       "--size", "512", "--steps", "1", "--save")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "generated Kiln stool, Kiln lamp" in done.stdout
    with bpy.data.libraries.load(str(blend)) as (saved, taken):
        assert sorted(saved.objects) == ["Kiln lamp", "Kiln stool"]
        taken.scenes = ["Scene"]
    scene = taken.scenes[0]
    assert tuple(scene.cursor.location) == (0.0, 1.0, 0.0)  # the file's cursor, not moved by the run
    assert [tuple(scene.objects[name].location) for name in ("Kiln stool", "Kiln lamp")] == [(0, 1, 0), (2.5, 1, 0)]
    bpy.data.scenes.remove(scene)


def write_cube_obj(path: Path, extents: tuple[float, float, float]) -> None:
    """A box as OBJ text: the 4.2 test environment has no mesh library, and none is needed."""
    half = (-0.5, 0.5)
    corners = [(x * extents[0], y * extents[1], z * extents[2]) for x in half for y in half for z in half]
    quads = [(1, 2, 4, 3), (5, 7, 8, 6), (1, 5, 6, 2), (3, 4, 8, 7), (1, 3, 7, 5), (2, 6, 8, 4)]
    lines = [f"v {x} {y} {z}" for x, y, z in corners] + [f"f {a} {b} {c} {d}" for a, b, c, d in quads]
    path.write_text("\n".join(lines) + "\n")


def test_index_libraries_then_texture_with_a_retrieved_reference(kiln, scene, tmp_path) -> None:
    library = tmp_path / "assets"
    library.mkdir()
    write_cube_obj(library / "wooden_crate.obj", (1.0, 0.7, 0.5))
    write_cube_obj(library / "metal_barrel.obj", (0.4, 0.4, 1.0))
    (library / "broken_lamp.obj").write_text("f 1 2 3\n")
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences
    prefs.libraries.clear()
    scene.use_references = True
    obj = add_cube()
    select(obj)
    with pytest.raises(RuntimeError, match="no asset library is set"):
        bpy.ops.kiln.texture_selected()
    assert obj.material_slots[0].material.name == "Artist Cube"

    assert bpy.ops.kiln.add_library() == {"FINISHED"}
    prefs.libraries[0].path = str(library)
    assert bpy.ops.kiln.index_libraries() == {"FINISHED"}
    notes = " ".join(kiln.operators.ACTIVE.notes)
    assert "2 assets (2 new" in notes and "skipped broken_lamp.obj" in notes, notes

    select(obj)
    assert bpy.ops.kiln.texture_selected() == {"FINISHED"}
    target = kiln.operators.ACTIVE.targets[0]
    assert target.status == "finished" and target.reference.startswith("wooden_crate.obj (score"), target.reference
    assert "reference wooden_crate.obj" in kiln.operators.ACTIVE.summary()
    assert bpy.ops.kiln.remove_library(index=0) == {"FINISHED"} and len(prefs.libraries) == 0


def flat_red_cube(name: str):
    obj = add_cube(name, artist_material=False)
    mat = bpy.data.materials.new(f"{name} red")
    if not mat.node_tree:
        mat.use_nodes = True
    next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"].default_value = \
        (0.8, 0.05, 0.05, 1.0)
    obj.data.materials.append(mat)
    return obj


def test_find_pick_and_object_references(kiln, scene, tmp_path) -> None:
    """Find References lists the library's nearest assets; a job uses the first ticked one; with the
    Object source the artist's own mesh (its flat colour) is the reference, for texturing and for
    generating; each missing piece gets a message that says what to do."""
    library = tmp_path / "assets"
    library.mkdir()
    write_cube_obj(library / "wooden_crate.obj", (1.0, 0.7, 0.5))
    write_cube_obj(library / "metal_barrel.obj", (0.4, 0.4, 1.0))
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences
    prefs.libraries.clear()
    prefs.libraries.add().path = str(library)
    assert bpy.ops.kiln.index_libraries() == {"FINISHED"}
    scene.use_references, scene.prompt = True, "a metal barrel"
    assert bpy.ops.kiln.find_references() == {"FINISHED"}
    assert [Path(h.file).name for h in scene.hits] == ["metal_barrel.obj", "wooden_crate.obj"]
    assert scene.hits[0].caption == "metal barrel" and scene.hits[0].score > scene.hits[1].score

    obj = add_cube()
    scene.hits[0].use = False
    select(obj)
    assert bpy.ops.kiln.texture_selected() == {"FINISHED"}
    assert kiln.operators.ACTIVE.targets[0].reference.startswith("wooden_crate.obj"), kiln.operators.ACTIVE.summary()
    scene.hits[1].use = False
    select(obj)
    with pytest.raises(RuntimeError, match="every found reference is unticked"):
        bpy.ops.kiln.texture_selected()
    assert bpy.ops.kiln.clear_references() == {"FINISHED"} and len(scene.hits) == 0

    scene.reference_source = "OBJECT"
    select(obj)
    with pytest.raises(RuntimeError, match="none is picked"):
        bpy.ops.kiln.texture_selected()
    scene.reference_object = flat_red_cube("Blockout")
    fields, arrays = kiln.operators.job_request(bpy.context)
    assert fields["reference_object"] == "Blockout" and fields["reference_color"][0] > 0.8
    assert fields["low_vram"] is False
    prefs.low_vram = True
    assert kiln.operators.job_request(bpy.context)[0]["low_vram"] is True
    assert arrays["reference_positions"].shape == (8, 3) and "reference_texture" not in arrays
    blue = bpy.data.materials.new("Blockout blue")  # a second colour on one face: sent face by face
    if not blue.node_tree:
        blue.use_nodes = True
    next(n for n in blue.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"].default_value = \
        (0.05, 0.05, 0.8, 1.0)
    scene.reference_object.data.materials.append(blue)
    scene.reference_object.data.polygons[0].material_index = 1
    fields, arrays = kiln.operators.job_request(bpy.context)
    assert [source["color"][2] > 0.8 for source in fields["reference_slot_sources"]] == [False, True]
    assert sorted(np.bincount(np.frombuffer(arrays["reference_triangle_slots"].data, np.int32))) == [2, 10]
    checker = blue.node_tree.nodes.new("ShaderNodeTexChecker")  # procedural: baked, as Kiln cannot read it
    blue.node_tree.links.new(checker.outputs["Color"], next(
        n for n in blue.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"])
    scene.reference_object.hide_render = True  # references are often kept out of renders, or hidden
    scene.reference_object.hide_set(True)
    fields, arrays = kiln.operators.job_request(bpy.context)
    assert arrays["reference_texture"].shape == (1024, 1024, 4) and "reference_slot_sources" not in fields
    assert len(blue.node_tree.nodes) == 3  # the bake's nodes are gone, and the object hidden again
    assert scene.reference_object.hide_render and scene.reference_object.hide_get()
    scene.reference_object.hide_render = False
    scene.reference_object.hide_set(False)
    lost = blue.node_tree.nodes.new("ShaderNodeTexImage")  # an image whose file is gone: refused, not sent flat
    lost.image = bpy.data.images.new("gone.png", 4, 4)
    lost.image.source, lost.image.filepath = "FILE", "//gone.png"
    blue.node_tree.links.new(lost.outputs["Color"], next(
        n for n in blue.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"])
    with pytest.raises(kiln.scene_io.SceneError, match="the reference object 'Blockout' cannot show its colours: the "
                                                       "Image Texture .* no pixels .*; or pick another reference"):
        kiln.operators.job_request(bpy.context)
    blue.node_tree.links.new(checker.outputs["Color"], next(
        n for n in blue.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"])
    select(obj)
    assert bpy.ops.kiln.texture_selected() == {"FINISHED"}
    assert kiln.operators.ACTIVE.targets[0].reference.startswith("Blockout (score 1.00")

    scene.prompt = "a red stool"
    assert bpy.ops.kiln.generate_object() == {"FINISHED"}
    target = kiln.operators.ACTIVE.targets[0]
    assert target.status == "finished" and target.reference.startswith("Blockout")
    assert target.name in bpy.data.objects
    scene.use_references = False


def write_asset_blend(path: Path) -> None:
    """A .blend holding a textured chair marked as an asset (description, tags), a two-part lamp
    collection asset, and an unmarked object; written without touching the open file."""
    bpy.ops.mesh.primitive_cube_add()
    chair = bpy.context.active_object
    chair.name = "OakChair"
    image = bpy.data.images.new("oak grain", 16, 16)
    pixels = np.zeros((16, 16, 4), np.float32)
    pixels[..., 0], pixels[..., 1], pixels[..., 3] = 0.7, 0.4, 1.0
    image.pixels.foreach_set(pixels.ravel())
    image.pack()
    mat = bpy.data.materials.new("oak")
    if not mat.node_tree:
        mat.use_nodes = True
    tex = mat.node_tree.nodes.new("ShaderNodeTexImage")
    tex.image = image
    bsdf = next(n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
    chair.data.materials.append(mat)
    chair.modifiers.new("Pair", "ARRAY").count = 2  # the asset is what its modifiers make: two cubes
    chair.asset_mark()
    chair.asset_data.description = "a sturdy oak chair"
    for tag in ("furniture", "wood"):
        chair.asset_data.tags.new(tag)
    lamp = bpy.data.collections.new("Desk_Lamp")
    for offset in (0.0, 1.5):  # far up, as assets laid out in a large scene may be
        bpy.ops.mesh.primitive_uv_sphere_add(location=(0, 0, 1e5 + offset))
        part = bpy.context.active_object
        for c in part.users_collection:
            c.objects.unlink(part)
        lamp.objects.link(part)
    lamp.asset_mark()
    bpy.ops.mesh.primitive_monkey_add()
    loose = bpy.context.active_object
    bpy.context.view_layer.update()  # world matrices, as a saved file has them
    bpy.data.libraries.write(str(path), {chair, lamp, loose}, fake_user=True)
    bpy.data.batch_remove([chair, loose, *lamp.objects, lamp, mat, image])


def test_paths_typed_in_the_preferences_with_a_tilde_spaces_or_quotes_are_found(kiln, tmp_path) -> None:
    """As are the environment's folder, or its bin folder, picked for Backend Python (the file
    browser makes picking a folder easy): the interpreter inside it is used."""
    python = kiln.backend_process.venv_python(tmp_path / "kiln env")
    python.parent.mkdir(parents=True)
    python.write_text("")
    for folder in (tmp_path / "kiln env", python.parent):
        assert kiln.backend_process.find_python(f"{folder}{os.sep}") == python
    (tmp_path / "empty").mkdir()
    with pytest.raises(kiln.backend_process.BackendError, match=r"is a folder with no Python in it: .*empty; choose"):
        kiln.backend_process.find_python(str(tmp_path / "empty"))
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences
    saved = [lib.path for lib in prefs.libraries]
    prefs.libraries.clear()
    prefs.libraries.add().path = "~/kiln assets "
    prefs.python_path = f'"{BACKEND_PYTHON}"'  # Windows' Copy as Path quotes what it copies
    prefs.clip_model = ' "~/clip" '
    try:
        assert kiln.properties.kiln_folders(prefs) == [str(Path.home() / "kiln assets")]
        assert kiln.properties.backend_found(prefs)
        assert kiln.properties.backend_choice(bpy.context).python_preference == BACKEND_PYTHON
        assert kiln.properties.library_fields(prefs)["clip"] == str(Path.home() / "clip")
    finally:
        prefs.python_path, prefs.clip_model = BACKEND_PYTHON, ""
        prefs.libraries.clear()
        for path in saved:
            prefs.libraries.add().path = path


def test_model_fields_take_paths_from_the_file_browser_and_pasted_ones(kiln, scene, tmp_path) -> None:
    """The model, LoRA, VAE and ControlNet fields browse for a file: in a saved .blend the browser
    writes a path relative to it ("//"), which the backend, started elsewhere, must get absolute.
    A path pasted with quotes (Windows' Copy as Path) or typed with "~" is read as meant; Hugging
    Face ids and 'tiny' go as typed. The LoRA's weight goes with a LoRA only."""
    fields = [scene.bl_rna.properties[name] for name in ("model", "lora", "vae", "controlnet")]
    assert all(field.subtype == "FILE_PATH" for field in fields)
    # Blender 4.5 lets a field hold "//" paths only when it says so: its browser then writes them.
    assert all(getattr(field, "is_path_supports_blend_relative", True) for field in fields)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 4.5: "does not support blend relative "//" prefix"
        scene.model = "//weights/model"
    scene.lora = f'"{tmp_path / "my lora.safetensors"}" '
    scene.vae, scene.controlnet = "~/vae", "lllyasviel/sd-controlnet-depth"
    fields = kiln.session.read_settings(scene)
    assert fields["model"] == str(tmp_path / "weights" / "model")
    assert fields["lora"] == str(tmp_path / "my lora.safetensors")
    assert fields["vae"] == str(Path.home() / "vae") and fields["controlnet"] == "lllyasviel/sd-controlnet-depth"
    assert fields["lora_weight"] == fields["controlnet_weight"] == 1.0
    scene.lora_weight, scene.lora, scene.controlnet = 0.5, "", ""  # a weight without its part is not sent
    assert not {"lora_weight", "controlnet_weight"} & set(kiln.session.read_settings(scene))
    scene.model = " tiny "
    assert kiln.session.read_settings(scene)["model"] == "tiny"


def test_blend_assets_whose_names_read_alike_in_a_file_name_keep_files_of_their_own(kiln, tmp_path) -> None:
    stems = []
    for name in ("Стул", "Стол", "Chair A", "Chair_A", "x" * 250):
        stems.append(kiln.blend_assets.unused_stem(tmp_path, name))
        (tmp_path / f"{stems[-1]}.obj").touch()
    assert stems == ["asset", "asset_2", "Chair_A", "Chair_A_2", "x" * 100]


def test_blend_assets_whose_colours_come_from_nodes_are_exported_baked(kiln, scene, tmp_path) -> None:
    """A procedural material (a red and blue checker) is exported as what it shows, baked by Cycles
    in a scene of its own; an asset without a UV map gets one by Smart UV Project for it, from Edit
    Mode on another object too. An asset whose UV map spans UDIM tiles, or whose image file is
    missing, keeps its flat colour, with a note saying why. The artist's scene, its render engine
    and Edit Mode included, is untouched."""
    checker = bpy.data.materials.new("painted checker")
    if not checker.node_tree:
        checker.use_nodes = True
    tree = checker.node_tree
    squares = tree.nodes.new("ShaderNodeTexChecker")
    squares.inputs["Color1"].default_value, squares.inputs["Color2"].default_value = (1, 0, 0, 1), (0, 0, 1, 1)
    tree.links.new(squares.outputs["Color"],
                   next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"])
    assets = []
    for name in ("Crate", "Bare", "Tiles"):
        bpy.ops.mesh.primitive_cube_add()
        obj = bpy.context.active_object
        obj.name = name
        obj.data.materials.append(checker)
        obj.asset_mark()
        assets.append(obj)
    lost = bpy.data.materials.new("lost oak")  # an image whose file is not there: a bake would copy the pink
    if not lost.node_tree:
        lost.use_nodes = True
    image = lost.node_tree.nodes.new("ShaderNodeTexImage")
    image.image = bpy.data.images.new("gone.png", 4, 4)
    image.image.source, image.image.filepath = "FILE", str(tmp_path / "gone.png")
    lost.node_tree.links.new(image.outputs["Color"],
                             next(n for n in lost.node_tree.nodes if n.type == "BSDF_PRINCIPLED").inputs["Base Color"])
    bpy.ops.mesh.primitive_cube_add()
    assets.append(bpy.context.active_object)
    assets[-1].name = "Lost"
    assets[-1].data.materials.append(lost)
    assets[-1].asset_mark()
    assets[1].data.uv_layers.remove(assets[1].data.uv_layers[0])
    uv = np.empty(len(assets[2].data.loops) * 2, np.float32)
    assets[2].data.uv_layers[0].data.foreach_get("uv", uv)
    assets[2].data.uv_layers[0].data.foreach_set("uv", uv + 1)  # tile 1012
    path = tmp_path / "crates.blend"
    bpy.data.libraries.write(str(path), set(assets), fake_user=True)
    bpy.data.batch_remove([*assets, checker, lost, image.image])
    edited = add_cube("Edited")
    select(edited)
    own_uvs = np.empty(len(edited.data.loops) * 2, np.float32)
    edited.data.uv_layers[0].data.foreach_get("uv", own_uvs)
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.mesh.select_all(action="DESELECT")
    engine, counts = bpy.context.scene.render.engine, {k: len(getattr(bpy.data, k)) for k in ("objects", "scenes")}

    count, notes = kiln.blend_assets.export_blend(path)
    assert count == 4 and sorted(notes) == [
        "crates.blend: Lost exported with flat colours: the Image Texture on 'lost oak''s Base Color shows "
        f"'gone.png', which has no pixels (its file {str(tmp_path / 'gone.png')!r} is missing or unreadable): find "
        "it (File > External Data > Find Missing Files)",
        "crates.blend: Tiles exported with flat colours: 'Tiles''s UV map 'UVMap' reaches past the unit square (UDIM "
        "tiles or repeats), so its material's colours cannot be baked into one image: wire an Image Texture into Base "
        "Color, or leave it: Kiln exports it for the libraries with flat colours"], notes
    assert bpy.context.scene.render.engine == engine and counts == {k: len(getattr(bpy.data, k)) for k in counts}
    assert bpy.context.mode == "EDIT_MESH" and bpy.context.view_layer.objects.active == edited
    folder = kiln.blend_assets.export_folder(path)
    for name in ("Crate", "Bare"):
        assert (folder / f"{name}.mtl").read_text().count("newmtl") == 1
        assert "map_Kd" in (folder / f"{name}.mtl").read_text() and "\nvt " in (folder / f"{name}.obj").read_text()
        baked = bpy.data.images.load(str(next(folder.glob(f"{name}_*.png"))))
        try:
            colours = {tuple(c) for c in np.round(pixels(baked).reshape(-1, 4)[:, :3], 2).tolist()}
        finally:
            bpy.data.images.remove(baked)
        assert {(1.0, 0.0, 0.0), (0.0, 0.0, 1.0)} <= colours, name
    tiles = (folder / "Tiles.mtl").read_text()
    assert "Kd 0.8000" in tiles and "map_Kd" not in tiles  # Kd linear, as Blender writes and reads it
    bpy.ops.object.mode_set(mode="OBJECT")
    # Smart UV Project ran on the asset's copy, not on the mesh the artist has in Edit Mode.
    after = np.empty_like(own_uvs)
    edited.data.uv_layers[0].data.foreach_get("uv", after)
    assert np.array_equal(after, own_uvs) and not any(p.select for p in edited.data.polygons)
    assert kiln.blend_assets.export_blend(path) == (count, notes)  # from Object Mode too


def test_a_collection_asset_is_exported_with_its_curves_and_text(kiln, scene, tmp_path) -> None:
    """A sign: a board (mesh), its lettering (text) and a hanging wire (a bevelled curve); each
    is part of what the asset looks like, exported as the mesh it evaluates to."""
    sign = bpy.data.collections.new("Sign")
    parts = []
    bpy.ops.mesh.primitive_cube_add()
    parts.append(bpy.context.active_object)
    bpy.ops.object.text_add(location=(0, 0, 1.2))
    parts.append(bpy.context.active_object)
    parts[-1].data.extrude = 0.05
    bpy.ops.curve.primitive_bezier_circle_add(location=(0, 0, 2))
    parts.append(bpy.context.active_object)
    parts[-1].data.bevel_depth = 0.02
    for part in parts:
        for c in part.users_collection:
            c.objects.unlink(part)
        sign.objects.link(part)
    sign.asset_mark()
    path = tmp_path / "signs.blend"
    bpy.data.libraries.write(str(path), {sign}, fake_user=True)
    kinds = sorted(o.type for o in sign.objects)
    bpy.data.batch_remove([*sign.objects, sign])
    assert kinds == ["CURVE", "FONT", "MESH"]

    assert kiln.blend_assets.export_blend(path) == (1, [])
    rows = [line.split() for line in (kiln.blend_assets.export_folder(path) / "Sign.obj").read_text().splitlines()]
    heights = [float(r[2]) for r in rows if r[0] == "v"]
    assert sum(r[0] == "f" for r in rows) > 500  # the cube's 12 triangles, the letters' and the wire's
    assert max(heights) - min(heights) > 2.9  # from the board's foot to the wire at the top


def test_blend_assets_are_exported_indexed_and_searchable(kiln, scene, tmp_path) -> None:
    """.blend files in Kiln's folders and in Blender's asset libraries: their mesh and collection
    assets are exported once (captions from the asset metadata), indexed with the rest, found by
    prompt; exported again only after a change, dropped when the file goes; the scene untouched."""
    folder, blender_library = tmp_path / "kiln_assets", tmp_path / "blender_assets"
    folder.mkdir()
    blender_library.mkdir()
    write_asset_blend(folder / "furniture.blend")
    write_cube_obj(folder / "metal_barrel.obj", (0.4, 0.4, 1.0))
    bpy.ops.mesh.primitive_cube_add()  # a stand-in for the artist's own scene
    write_asset_blend(blender_library / "more.blend")
    prefs = bpy.context.preferences.addons[kiln.__name__].preferences
    prefs.libraries.clear()
    prefs.libraries.add().path = str(folder)
    prefs.use_blender_libraries = True
    bpy.ops.preferences.asset_library_add(directory=str(blender_library))
    counts = {kind: len(getattr(bpy.data, kind))
              for kind in ("objects", "meshes", "materials", "images", "libraries", "scenes")}

    assert bpy.ops.kiln.index_libraries() == {"FINISHED"}
    notes = " ".join(kiln.operators.ACTIVE.notes)
    assert "furniture.blend: 2 assets exported" in notes and "more.blend: 2 assets exported" in notes, notes
    assert {kind: len(getattr(bpy.data, kind)) for kind in counts} == counts
    exports = kiln.blend_assets.cache_root()
    chair = next(exports.glob("furniture-*/OakChair.obj"))
    assert (chair.parent / "OakChair.obj.txt").read_text().strip() == "oak chair: a sturdy oak chair (furniture, wood)"
    assert "map_Kd" in (chair.parent / "OakChair.mtl").read_text() and any(chair.parent.glob("*.png"))
    rows = [line.split() for line in chair.read_text().splitlines()]
    assert sum(r[0] == "f" for r in rows) == 24 and max(float(r[1]) for r in rows if r[0] == "v") == pytest.approx(2)
    lamp = [line.split() for line in (chair.parent / "Desk_Lamp.obj").read_text().splitlines()]
    heights = [float(v[2]) for v in lamp if v[0] == "v"]
    # Both parts where they stand in the .blend, Z-up turned Y-up, the whole centred and unblurred.
    assert max(heights) == pytest.approx(1.75, abs=1e-4) and min(heights) == pytest.approx(-1.75, abs=1e-4)

    scene.prompt, scene.use_references = "a wooden chair", True
    assert bpy.ops.kiln.find_references() == {"FINISHED"}
    assert scene.hits[0].file.endswith("OakChair.obj") and scene.hits[0].caption.startswith("oak chair")

    assert bpy.ops.kiln.index_libraries() == {"FINISHED"}  # nothing changed: nothing exported
    assert "exported" not in " ".join(kiln.operators.ACTIVE.notes)
    (blender_library / "more.blend").unlink()
    assert bpy.ops.kiln.index_libraries() == {"FINISHED"}
    assert not list(exports.glob("more-*")) and list(exports.glob("furniture-*"))
    (folder / "broken.blend").write_bytes(b"not a blend file")
    assert bpy.ops.kiln.index_libraries() == {"FINISHED"}
    assert "skipped broken.blend" in " ".join(kiln.operators.ACTIVE.notes)
    assert not list(exports.glob("broken-*"))

    write_asset_blend(folder / "extra.blend")  # cancelled while exporting: nothing exported, nothing sent
    session = kiln.session.IndexSession(kiln.properties.library_fields(prefs),
                                        kiln.properties.blend_folders(bpy.context),
                                        kiln.properties.backend_choice(bpy.context))
    session.start()
    session.cancel()
    session.pump()
    assert session.finished and session.targets[0].status == "cancelled" and session.client is None
    assert not list(exports.glob("extra-*"))
    bpy.ops.preferences.asset_library_remove(index=len(bpy.context.preferences.filepaths.asset_libraries) - 1)
    scene.use_references = False
