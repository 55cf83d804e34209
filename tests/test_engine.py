"""The texturing job without a server: mesh validation, unwrapping, SIR, model loading, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

from backend import protocol
from backend.events import TextureEvents
from backend.jobs import JobError, JobRequest, ModelCache, run_texture_job
from backend.mesh import Mesh, MeshError
from backend.mesh_file import load_mesh_file
from backend.presets import PRESETS, resolve
from backend.prior import ModelError, load_prior
from backend.protocol import MAX_TRIANGLES
from backend.sir import t2_schedule
from backend.texture import sample_image, to_rgba8
from backend.unwrap import Unwrapping, unwrap

VASE = ROOT / "examples" / "vase.obj"
#: The scheduler settings of Stable Diffusion 1.5's published folder, which saved test models copy.
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


class Recorder(TextureEvents):
    def __init__(self) -> None:
        self.progress_calls: list[tuple[int, int, str]] = []
        self.textures: list[tuple[np.ndarray, bool]] = []
        self.uv_updates = 0
        self.tile_updates: list[list[list[int]]] = []

    def progress(self, done, total, phase):
        self.progress_calls.append((done, total, phase))

    def texture(self, rgba, final):
        self.textures.append((rgba.numpy().copy(), final))

    def uvs(self, loop_uvs, corner_uvs):
        self.uv_updates += 1

    def tiles(self, tiles):
        self.tile_updates.append(tiles)


def grid_mesh() -> Mesh:
    mesh, _ = load_mesh_file(VASE)
    return mesh


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.positions.__setitem__((0, 0), np.inf), "NaN or infinite"),
    (lambda m: setattr(m, "triangles", np.zeros((0, 3), np.int64)), "has no faces"),
    (lambda m: setattr(m, "triangles", np.zeros((MAX_TRIANGLES + 1, 3), np.int64)), "Decimate"),
    (lambda m: setattr(m, "positions", np.zeros_like(m.positions)), "zero size"),
])
def test_bad_meshes_are_refused_with_the_fix(change, fragment) -> None:
    mesh = grid_mesh()
    change(mesh)
    with pytest.raises(MeshError, match=fragment):
        mesh.validate()


def test_an_empty_or_cut_short_mesh_file_is_named_as_such(tmp_path) -> None:
    """A failed export or copy: trimesh's words ("index 0 is out of bounds", "chunk was not expected
    length!") named no cause."""
    import trimesh

    (tmp_path / "empty.glb").write_bytes(b"")
    with pytest.raises(MeshError, match=r"'.*empty.glb' is empty \(0 bytes\): export or copy it again"):
        load_mesh_file(tmp_path / "empty.glb")
    (tmp_path / "cut.glb").write_bytes(trimesh.creation.box().export(file_type="glb")[:300])
    with pytest.raises(MeshError, match=r"could not read '.*cut.glb' as a mesh: .*\(is it cut short or of another "
                                        r"format\? export it again\)"):
        load_mesh_file(tmp_path / "cut.glb")


def test_a_file_of_a_type_kiln_does_not_read_names_the_ones_it_does(tmp_path) -> None:
    """trimesh's "file_type 'fbx' not supported" named neither the formats it reads nor the export,
    and a folder was said not to exist."""
    import trimesh

    for name in ("chair.fbx", "chair"):
        (tmp_path / name).write_bytes(b"Kaydara FBX Binary")
        with pytest.raises(MeshError, match=r"Kiln reads .glb, .gltf, .obj, .ply, .stl, .off: export it as .glb"):
            load_mesh_file(tmp_path / name)
    (tmp_path / "scene.blend").write_bytes(b"BLENDER-v500")
    with pytest.raises(MeshError, match=r"is a Blender file, .* --python examples/batch_texture.py"):
        load_mesh_file(tmp_path / "scene.blend")
    (tmp_path / "parts.obj").mkdir()
    with pytest.raises(MeshError, match=r"'.*parts.obj' is a folder: give the mesh file in it"):
        load_mesh_file(tmp_path / "parts.obj")
    trimesh.creation.box().export(tmp_path / "BOX.STL")  # an upper-case name is the same type
    assert load_mesh_file(tmp_path / "BOX.STL")[0].triangle_count == 12


def test_unwrap_gives_per_loop_uvs_that_reproduce_the_corners() -> None:
    mesh = grid_mesh()
    assert mesh.corner_uvs is None
    mesh.tri_loops = np.arange(mesh.triangle_count * 3).reshape(-1, 3)
    mesh.loop_count = mesh.triangle_count * 3
    loop_uvs = unwrap(mesh)
    assert loop_uvs.shape == (mesh.loop_count, 2)
    assert np.array_equal(mesh.corner_uvs, loop_uvs[mesh.tri_loops])
    assert (loop_uvs >= 0).all() and (loop_uvs <= 1).all()
    assert (np.abs(mesh.uv_areas()) > 0).mean() > 0.99  # no collapsed charts


def uv_overlap(corner_uvs: np.ndarray, size: int = 256) -> int:
    """The most triangles covering one pixel centre of a size² UV grid (1 where charts do not overlap)."""
    count = np.zeros((size, size), np.int32)
    centres = (np.arange(size) + 0.5) / size
    for a, b, c in corner_uvs.astype(np.float64):
        lo = np.floor(np.minimum(np.minimum(a, b), c) * size).astype(int)
        hi = np.ceil(np.maximum(np.maximum(a, b), c) * size).astype(int)
        u, v = np.meshgrid(centres[lo[0]:hi[0]], centres[lo[1]:hi[1]], indexing="ij")
        d = (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
        w1 = ((u - a[0]) * (c[1] - a[1]) - (v - a[1]) * (c[0] - a[0])) / d
        w2 = ((b[0] - a[0]) * (v - a[1]) - (b[1] - a[1]) * (u - a[0])) / d
        inside = (w1 > 1e-6) & (w2 > 1e-6) & (w1 + w2 < 1 - 1e-6)
        count[lo[0]:hi[0], lo[1]:hi[1]] += inside
    return int(count.max())


def test_unwrapping_does_not_depend_on_the_meshs_scale() -> None:
    """xatlas's degenerate-face thresholds are absolute: a bead modelled in metres (radius 1 mm)
    came back with NaN UVs, which crashed the job. Any uniform scale now gets whole, separate charts
    (float rounding still moves them about), and a mesh whose faces all lack area is refused with
    the fix."""
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=2)
    meshes = [Mesh(np.asarray(sphere.vertices * scale, np.float32), np.asarray(sphere.faces, np.int64), None,
                   name="bead") for scale in (1.0, 1e-3, 1e-6, 1e4)]
    for mesh in meshes:
        unwrap(mesh)
        uvs = mesh.corner_uvs
        assert np.isfinite(uvs).all() and (uvs >= 0).all() and (uvs <= 1).all()
        assert (np.abs(mesh.uv_areas()) > 0).all() and uv_overlap(uvs) == 1
    flat = Mesh(np.zeros((3, 3), np.float32), np.array([[0, 1, 2]], np.int64), None, name="dust")
    with pytest.raises(MeshError, match="'dust' has no faces with area .* Merge by Distance"):
        unwrap(flat)


def test_big_meshes_unwrap_in_pieces_packed_into_one_atlas(monkeypatch) -> None:
    import trimesh

    from backend import unwrap as unwrapping

    sphere = trimesh.creation.icosphere(subdivisions=3)
    mesh = Mesh(np.asarray(sphere.vertices, np.float32), np.asarray(sphere.faces, np.int64), None, name="sphere")
    pieces = unwrapping.split_faces(mesh.positions[mesh.triangles].mean(1), 200)
    assert len(pieces) == 8 and all(len(p) <= 200 for p in pieces)
    assert np.array_equal(np.sort(np.concatenate(pieces)), np.arange(mesh.triangle_count))
    monkeypatch.setattr(unwrapping, "SINGLE_PIECE_FACES", 500)
    monkeypatch.setattr(unwrapping, "PIECE_FACES", 200)
    unwrap(mesh)
    uvs = mesh.corner_uvs
    assert uvs.shape == (mesh.triangle_count, 3, 2) and (uvs >= 0).all() and (uvs <= 1).all()
    assert (np.abs(mesh.uv_areas()) > 0).mean() > 0.99
    assert uv_overlap(uvs) == 1  # the pieces' charts are packed side by side, not on top of each other


def test_the_unwrapping_child_does_not_import_torch() -> None:
    """Every job without UVs starts the child: importing torch in it cost more than xatlas itself
    (a 50k-face mesh on 2 cores: about 2.5 s in all with torch, 0.7-1.3 s without)."""
    probe = "import sys, backend.unwrap; print(sorted(m for m in ('torch', 'bpy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.stdout.strip() == "[]"


def test_unwrap_failures_cost_the_job_not_the_backend(tmp_path) -> None:
    from backend.events import Cancelled

    broken = grid_mesh()
    broken.triangles = broken.triangles + broken.positions.shape[0]  # xatlas refuses indices past the vertices
    with pytest.raises(MeshError, match="xatlas failed unwrapping mesh .* Smart UV Project"):
        unwrap(broken)
    with pytest.raises(MeshError, match=r"took over 0.05 s, so Kiln stopped it: give it a UV map"):
        unwrap(grid_mesh(), time_limit=0.05)
    with pytest.raises(Cancelled):
        unwrap(grid_mesh(), cancelled=lambda: True)
    mesh = grid_mesh()
    unwrap(mesh)  # and the next one works
    assert mesh.corner_uvs.shape == (mesh.triangle_count, 3, 2)


def test_a_child_that_dies_before_its_job_is_an_error_not_a_hang(monkeypatch) -> None:
    """A spare can die between the check that it lives and the job's go: the job fails with the
    fix, and closing its pipe raises nothing."""
    from backend import unwrap as unwrapping

    def dead() -> unwrapping._Child:
        child = unwrapping._Child()
        child.process.kill()
        child.process.wait()
        return child
    monkeypatch.setattr(unwrapping, "_take_child", dead)
    with pytest.raises(MeshError, match=r"xatlas crashed \(signal .*Smart UV Project"):
        unwrap(grid_mesh())


def test_a_kept_spare_child_takes_the_next_job_and_a_new_one_waits_behind_it() -> None:
    """The server keeps an xatlas child started ahead: a job hands its mesh to that process (Python
    and the imports already paid), the next spare starts at once, a dead spare is replaced, and
    the UVs are the ones a fresh child gives."""
    from backend import unwrap as unwrapping

    fresh = grid_mesh()
    unwrap(fresh)
    unwrapping.keep_spare()
    try:
        spare = unwrapping._spare
        mesh = grid_mesh()
        with Unwrapping(mesh) as job:
            assert job.child is spare.process and unwrapping._spare is not spare
            job.apply()
        assert np.array_equal(mesh.corner_uvs, fresh.corner_uvs)
        assert not os.path.exists(spare.folder.name)
        unwrapping._spare.process.kill()  # a spare that died waiting is not handed a job
        unwrapping._spare.process.wait()
        again = grid_mesh()
        unwrap(again)
        assert np.array_equal(again.corner_uvs, fresh.corner_uvs)
        last = unwrapping._spare
        assert last.process.poll() is None
    finally:
        unwrapping.discard_spare()
    assert unwrapping._spare is None and last.process.poll() is not None and not os.path.exists(last.folder.name)
    with Unwrapping(grid_mesh()):
        assert unwrapping._spare is None  # no longer kept: a job starts its own child and no spare


def test_a_spare_child_exits_when_the_backend_goes_without_a_word() -> None:
    """A backend killed outright closes its end of the spare's stdin: the spare exits, not
    lingers, and removes its folder, which no one else is left to remove."""
    from backend import unwrap as unwrapping

    spare = unwrapping._Child()
    spare.process.stdin.close()
    assert spare.process.wait(timeout=30) == 0 and not os.path.exists(spare.folder.name)
    spare.close()  # and the backend's own clean-up, had it lived, finds nothing to do


def test_an_xatlas_crash_is_a_clear_error_and_splitting_avoids_it(monkeypatch) -> None:
    import trimesh

    from backend import unwrap as unwrapping

    sphere = trimesh.creation.icosphere(subdivisions=6)  # 81,920 faces, perfectly regular
    mesh = Mesh(np.asarray(sphere.vertices, np.float32), np.asarray(sphere.faces, np.int64), None, name="ico")
    monkeypatch.setattr(unwrapping, "SINGLE_PIECE_FACES", mesh.triangle_count)
    try:
        unwrap(mesh)
        pytest.skip("this xatlas no longer crashes on a regular 82k-face icosphere in one piece")
    except MeshError as error:
        assert "xatlas crashed (signal" in str(error) and "Smart UV Project" in str(error)
    monkeypatch.undo()
    unwrap(mesh)
    assert mesh.corner_uvs.shape == (mesh.triangle_count, 3, 2)  # in pieces, as jobs run it


def test_unwrapping_runs_while_the_model_loads(monkeypatch) -> None:
    """xatlas starts before the model loads and works alongside it; a model that fails to load
    stops the child and leaves no files behind, and the job's texture is the same either way."""
    from backend import jobs

    started: list = []
    monkeypatch.setattr(jobs, "Unwrapping", lambda mesh: started.append(Unwrapping(mesh)) or started[-1])
    order: list[str] = []

    class Loading(ModelCache):
        def get(self, request, events):
            order.append("running" if started and started[-1].child.poll() is None else "not started")
            if request.model == "broken":
                raise ModelError(protocol.E_MODEL_NOT_FOUND, "broken weights")
            return super().get(request, events)

    request = JobRequest.from_fields({"prompt": "a vase", "texture_size": 512, "steps": 1})
    overlapped = run_texture_job(request, grid_mesh(), Recorder(), Loading())
    with pytest.raises(ModelError, match="broken weights"):
        run_texture_job(JobRequest.from_fields({"prompt": "a vase", "model": "broken"}), grid_mesh(), Recorder(),
                        Loading())
    assert order == ["running", "running"]
    assert started[-1].child.poll() is not None and not os.path.exists(started[-1].worker.folder.name)
    mesh = grid_mesh()
    unwrap(mesh)
    assert torch.equal(run_texture_job(request, mesh, Recorder(), ModelCache()), overlapped)


def test_tiled_uvs_texture_as_blender_repeats_them_and_shared_texels_get_a_note() -> None:
    """Blender's Image Texture repeats the image outside the unit square, so a UV map moved by
    whole tiles gets the texture its unmoved islands would, where they will be shown; islands
    stacked on others get a note that those faces share texels, and unique UVs get none."""
    request = JobRequest.from_fields({"prompt": "a vase", "texture_size": 512, "steps": 1})
    models = ModelCache()
    mesh = grid_mesh()
    unwrap(mesh)
    events = Logged()
    unique = run_texture_job(request, mesh, events, models)
    mesh.corner_uvs = mesh.corner_uvs + np.float32([3, -2])
    tiled = run_texture_job(request, mesh, events, models)
    assert not any("share texels" in line for line in events.lines)
    # The same texture but where float rounding moves a pixel across a coverage cell's edge
    # (+3 costs the UVs two bits), which changes what in-painting fills around it.
    assert ((tiled - unique).abs() > 0.01).float().mean() < 1e-3 and (tiled - unique).abs().mean() < 1e-4
    half = len(mesh.triangles) // 2
    mesh.corner_uvs[half:2 * half] = mesh.corner_uvs[:half]  # half the faces painted over the other half
    run_texture_job(request, mesh, events, models)
    notes = [line for line in events.lines if "share texels" in line]
    assert len(notes) == 1 and "Smart UV Project" in notes[0]


def test_a_udim_map_is_textured_with_each_tile_in_a_cell_of_its_own() -> None:
    """Half the vase's faces stacked on the other half: in one tile they share texels; with the
    stacked half moved to tile 1002 (as UDIM maps lay faces out) each face gets its own, and the
    front end is told the tiles so it can add the map that reads them."""
    request = JobRequest.from_fields({"prompt": "a vase", "texture_size": 512, "steps": 1})
    models = ModelCache()
    mesh = grid_mesh()
    unwrap(mesh)
    half = len(mesh.triangles) // 2
    mesh.corner_uvs[half:2 * half] = mesh.corner_uvs[:half]
    pairs = []
    for shift in (0, 1):
        mesh.corner_uvs[half:2 * half, :, 0] = mesh.corner_uvs[:half, :, 0] + shift
        events = Logged()
        texture = run_texture_job(request, mesh, events, models)
        centres = torch.as_tensor(mesh.corner_uvs).mean(1)
        colours = sample_image(texture, centres)
        pairs.append((colours[:half] - colours[half:2 * half]).abs().mean().item())
        notes = [line for line in events.lines if "share texels" in line or "UDIM" in line]
        if shift:
            assert events.tile_updates == [[[0, 0], [1, 0]]] and len(notes) == 1, notes
            assert "UDIM tiles 1001, 1002" in notes[0] and "'KilnUDIM'" in notes[0]
            assert mesh.corner_uvs.min() >= 0 and mesh.corner_uvs.max() <= 1
        else:
            assert events.tile_updates == [] and len(notes) == 1 and "share texels" in notes[0]
    assert pairs[0] < 1e-3 < 0.01 < pairs[1]  # stacked faces get one colour, tiled faces their own


def test_refining_a_udim_map_starts_each_face_from_its_own_tile() -> None:
    """One quad in tile 1001 and one in 1002, at the same place within their tiles: refined, each
    starts from its own tile's image in its own cell, or from the one image when only one is sent."""
    from backend.jobs import lay_out_tiles
    from backend.texture import SlotTextures

    quad = np.float32([[[0.2, 0.2], [0.8, 0.2], [0.8, 0.8]], [[0.2, 0.2], [0.8, 0.8], [0.2, 0.8]]])
    positions = np.float32([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [2, 0, 0], [3, 0, 0], [3, 1, 0], [2, 1, 0]])
    mesh = Mesh(positions, np.int64([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]]),
                np.concatenate([quad, quad + [1, 0]]).astype(np.float32))
    ramp = torch.linspace(0, 1, 32).expand(3, 32, 32).clone()  # brighter with u
    blue = torch.zeros(3, 32, 32)
    blue[2] = 1
    original = torch.as_tensor(mesh.corner_uvs.copy())
    start = lay_out_tiles(mesh, Logged(), ramp).compose(torch.device("cpu"))
    cells = torch.as_tensor(mesh.corner_uvs)
    for tile in (0, 2):  # each quad's texels read the ramp where its UVs lay within their tile
        inside = cells[tile:tile + 2].mean(1)
        assert torch.allclose(sample_image(start, inside), sample_image(ramp, original[tile:tile + 2].mean(1)),
                              atol=0.03)
    mesh.corner_uvs = original.numpy().copy()
    slots = SlotTextures(ramp, original, torch.tensor([0, 0, 1, 1]), [(ramp, original), (blue, original)])
    start = lay_out_tiles(mesh, Logged(), slots).compose(torch.device("cpu"))
    cells = torch.as_tensor(mesh.corner_uvs).mean(1)
    assert torch.allclose(sample_image(start, cells[2:]), torch.tensor([0.0, 0, 1]), atol=1e-5)
    assert sample_image(start, cells[:2])[:, 2].max() < 0.9


@pytest.mark.parametrize("method", ["sir", "sds"])
def test_repainting_selected_faces_keeps_every_other_faces_texture(method, monkeypatch) -> None:
    """Only Selected Faces: the vase's upper half repainted from a striped texture. Every texture
    the job streams, and the last, keeps the lower half's texels as they were, while the upper
    half's change, and the views frame the upper half. The wire's mask reaches the mesh, and a mask
    without a texture to keep, of the wrong length or of no face is refused with the fix."""
    from backend import texturing
    from backend.jobs import kept_texture_size, mesh_from_message

    framed, orbit = [], texturing.orbit
    monkeypatch.setattr(texturing, "orbit", lambda *args, focus, **kwargs: framed.append(focus) or
                        orbit(*args, focus=focus, **kwargs))

    mesh = grid_mesh()
    unwrap(mesh)
    size = 512
    stripes = torch.zeros(3, size, size)
    stripes[0, :, ::8] = 1.0  # red stripes: detail a repaint would not keep by chance
    stripes[2] = 0.5
    heights = mesh.positions[mesh.triangles].mean(1)[:, 1]
    mesh.paint = heights > np.median(heights)
    events, notes = Recorder(), []
    events.log = notes.append
    # Asked for 1024², it stays at the image's 512², where the kept texels are the image's own.
    request = JobRequest.from_fields({"prompt": "a vase", "texture_size": 1024, "steps": 2, "method": method,
                                      "strength": 1.0})
    run_texture_job(request, mesh, events, ModelCache(), init_texture=stripes)
    assert all(rgba.shape == (size, size, 4) for rgba, _ in events.textures)
    assert any("stays at its image's own 512² rather than the 1024² asked for" in note for note in notes)
    start = to_rgba8(stripes).numpy()
    texel = (np.clip(mesh.corner_uvs.mean(1), 0, 1 - 1e-6) * size).astype(int)  # each triangle's centre texel
    at_centres = start[texel[:, 1], texel[:, 0]]
    assert events.textures[-1][1] and (method == "sds" or len(events.textures) >= 2)  # SIR streams as it goes
    for rgba, _final in events.textures:
        now = rgba[texel[:, 1], texel[:, 0]]
        kept = (now[~mesh.paint] == at_centres[~mesh.paint]).all(axis=1)
        assert kept.mean() > 0.99, kept.mean()
    changed = np.abs(now[mesh.paint].astype(int) - at_centres[mesh.paint]).max(axis=1) > 8
    assert changed.mean() > 0.2, changed.mean()  # two SDS steps move a quarter of them that far, SIR most
    assert framed and all(np.array_equal(f, mesh.positions[mesh.triangles[mesh.paint]].reshape(-1, 3)) for f in framed)

    with pytest.raises(JobError, match="no texture for the others to keep"):
        run_texture_job(request, mesh, Recorder(), ModelCache())
    wide = Recorder()
    wide.log = notes.append
    assert kept_texture_size(request, mesh, torch.zeros(3, 512, 1024), wide) == 1024
    assert "its image is 1024×512, which Kiln does not make" in notes[-1]
    for paint, fragment in ((mesh.paint[1:], "triangles marked to repaint"), (mesh.paint & False, "no faces selected")):
        mesh.paint = paint
        with pytest.raises(MeshError, match=fragment):
            mesh.validate()
    flags = np.uint8([1, 0])
    msg = protocol.Message(protocol.SUBMIT, {}, {
        "positions": protocol.array("<f4", (4, 3), np.float32([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])),
        "triangles": protocol.array("<i4", (2, 3), np.int32([[0, 1, 2], [0, 2, 3]])),
        protocol.PAINT_TRIANGLES: protocol.array("|u1", (2,), flags)})
    assert mesh_from_message(msg).paint.tolist() == [True, False]


def test_a_refine_job_starts_from_each_materials_own_image_or_colour() -> None:
    """A quad's two triangles in two material slots: slot 0's image is the texture's base, slot 1
    shows another image through another UV map (here that image's right half, mirrored), and a
    flat colour replaces it when slot 1 has no image. Each triangle's texels start from its own."""
    from backend.jobs import JobError, init_texture_from_message, mesh_from_message

    positions = np.float32([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    loops = np.int32([[0, 1, 2], [3, 4, 5]])
    loop_uvs = np.float32([[0, 0], [1, 0], [1, 1], [0, 0], [1, 1], [0, 1]])        # the texture's map
    other_uvs = np.float32([[0, 0], [0, 0], [0, 0], [1, 0], [0.5, 1], [1, 1]])     # slot 1's own map
    base = np.zeros((8, 8, 4), np.uint8)
    base[..., 0] = 255
    ramp = np.zeros((16, 16, 4), np.uint8)
    ramp[..., 2] = np.arange(16, dtype=np.uint8)[None, :] * 16  # blue grows with u

    def message(source) -> protocol.Message:
        arrays = {"positions": protocol.array("<f4", (4, 3), positions),
                  "triangles": protocol.array("<i4", (2, 3), np.int32([[0, 1, 2], [0, 2, 3]])),
                  "tri_loops": protocol.array("<i4", (2, 3), loops),
                  "loop_uvs": protocol.array("<f4", (6, 2), loop_uvs),
                  "init_texture": protocol.array("|u1", base.shape, base),
                  "slot_texture_1": protocol.array("|u1", ramp.shape, ramp),
                  "slot_uvs_1": protocol.array("<f4", (6, 2), other_uvs),
                  "triangle_slots": protocol.array("<i4", (2,), np.int32([0, 1]))}
        return protocol.Message(protocol.SUBMIT, {"loop_count": 6, "slot_sources": [None, source]}, arrays)

    msg = message({"texture": "slot_texture_1", "uvs": "slot_uvs_1"})
    texture = init_texture_from_message(msg, mesh_from_message(msg)).compose(torch.device("cpu"))
    assert texture.shape == (3, 16, 16)  # the larger image's size
    lower, upper = texture[:, 2, 13], texture[:, 13, 2]  # texel centres inside triangle 0 (v < u) and 1
    assert torch.allclose(lower, torch.tensor([1.0, 0, 0]))
    assert upper[0] == 0 and 0.5 < upper[2] < 1  # the ramp's right half: u from 1 down to 0.5
    msg = message({"color": [0.0, 1.0, 0.0]})
    texture = init_texture_from_message(msg, mesh_from_message(msg)).compose(torch.device("cpu"))
    assert torch.allclose(texture[:, 6, 1], torch.tensor([0.0, 1, 0])) and torch.allclose(texture[:, 1, 6], lower)
    assert texture.shape == (3, 8, 8)  # a colour has no size: the first image's is kept
    msg = message({"texture": "slot_texture_1", "uvs": "missing"})
    with pytest.raises(JobError, match="'missing' must be the mesh's"):
        init_texture_from_message(msg, mesh_from_message(msg))
    msg = message({"color": ["red", 0, 0]})
    with pytest.raises(JobError, match="each slot's source is a color"):
        init_texture_from_message(msg, mesh_from_message(msg))


def test_a_reference_object_with_several_materials_shows_each_faces_own() -> None:
    """The artist's reference object: flat colours per material become each triangle's colour; an
    image per material (or per UDIM tile) is composed in the job, on its device, into one texture."""
    from backend.retrieve import asset_from_message
    from backend.texture import SlotTextures

    p = protocol.REFERENCE_PREFIX
    quad = {p + "positions": protocol.array("<f4", (4, 3), np.float32([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])),
            p + "triangles": protocol.array("<i4", (2, 3), np.int32([[0, 1, 2], [0, 2, 3]])),
            p + "tri_loops": protocol.array("<i4", (2, 3), np.int32([[0, 1, 2], [3, 4, 5]])),
            p + "triangle_slots": protocol.array("<i4", (2,), np.int32([0, 1]))}
    colours = protocol.Message(protocol.SUBMIT, {p + "loop_count": 6, p + "color": [1.0, 0, 0],
                                                 p + "slot_sources": [{"color": [1.0, 0, 0]}, {"color": [0, 0, 1.0]}]},
                               quad)
    asset, _ = asset_from_message(colours)
    assert asset.texture is None and asset.corner_colours[:, 0].tolist() == [[1, 0, 0], [0, 0, 1]]
    uvs = protocol.array("<f4", (6, 2), np.float32([[0, 0], [1, 0], [1, 1], [0, 0], [1, 1], [0, 1]]))
    red, blue = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    images = protocol.Message(protocol.SUBMIT, {
        p + "loop_count": 6, p + "slot_sources": [{"texture": "texture", "uvs": "loop_uvs"},
                                                  {"texture": "slot_texture_1", "uvs": "loop_uvs"}]},
        {**quad, p + "loop_uvs": uvs, p + "texture": protocol.array("|u1", red.shape, red),
         p + "slot_texture_1": protocol.array("|u1", blue.shape, blue)})
    asset, _ = asset_from_message(images)
    assert isinstance(asset.texture, SlotTextures)
    texture = asset.resolved(torch.device("cpu")).texture
    assert texture[:, 0, 3].tolist() == [1, 0, 0] and texture[:, 3, 0].tolist() == [0, 0, 1]
    # A UDIM map: the second triangle at the first's place, one tile to the right, with that tile's
    # image. Wrapped into one square they would cover the same texels; each gets a cell of its own.
    udim = np.float32([[0, 0], [1, 0], [1, 1], [1, 0], [2, 0], [2, 1]])
    images.arrays[p + "loop_uvs"] = protocol.array("<f4", (6, 2), udim)
    asset, _ = asset_from_message(images)
    cells = torch.as_tensor(asset.mesh.corner_uvs).mean(1)
    assert cells[0, 0] < 0.5 < cells[1, 0]
    texture = asset.resolved(torch.device("cpu")).texture
    assert torch.allclose(sample_image(texture, cells), torch.tensor([[1.0, 0, 0], [0, 0, 1]]), atol=0.05)  # 4² texels


def test_presets_hold_every_setting_and_reject_unknown_ones() -> None:
    cfg = resolve("sir", "quality", {"iterations": 3, "guidance": None})
    assert cfg.iterations == 3 and cfg.guidance == PRESETS["sir"]["quality"].guidance
    with pytest.raises(ValueError, match="unknown sir setting"):
        resolve("sir", "quality", {"iteration": 3})
    with pytest.raises(ValueError, match="unknown method"):
        resolve("dreamfusion", "quality", {})
    assert resolve("ssd", "quality", {}).guidance == 7.5 and resolve("sds", "quality", {}).guidance == 100.0
    schedule = t2_schedule(cfg, 1000)
    assert schedule[0] == pytest.approx(cfg.t_start * 1000) and schedule[-1] == pytest.approx(cfg.t_end * 1000)
    assert schedule == sorted(schedule, reverse=True)


def test_tiny_job_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    models = ModelCache()

    def run(seed: int) -> Recorder:
        rec = Recorder()
        request = JobRequest.from_fields({"prompt": "a vase", "model": "tiny", "texture_size": 512,
                                              "steps": 1, "seed": seed})
        run_texture_job(request, grid_mesh(), rec, models)
        return rec

    a, b, c = run(3), run(3), run(4)
    assert a.uv_updates == 1
    assert a.textures[-1][1] and np.array_equal(a.textures[-1][0], b.textures[-1][0])
    assert not np.array_equal(a.textures[-1][0], c.textures[-1][0])
    done = [p[0] for p in a.progress_calls]
    assert done == sorted(done) and done[-1] == a.progress_calls[-1][1]


def test_sir_denoises_its_first_views_while_xatlas_unwraps_and_ends_as_if_it_had_waited() -> None:
    """Views sampled from pure noise need no UVs, so SIR starts on them while xatlas still runs; the
    result is the one the same job gets with those UVs given up front."""
    class Ordered(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.order: list[str] = []

        def progress(self, done, total, phase):
            super().progress(done, total, phase)
            self.order.append(phase)

        def uvs(self, loop_uvs, corner_uvs):
            super().uvs(loop_uvs, corner_uvs)
            self.order.append("UVs")

    models = ModelCache()
    request = JobRequest.from_fields({"prompt": "a vase", "model": "tiny", "texture_size": 512, "steps": 1,
                                      "seed": 5})
    unwrapped, overlapped = grid_mesh(), Ordered()
    assert unwrapped.corner_uvs is None
    run_texture_job(request, unwrapped, overlapped, models)
    assert overlapped.uv_updates == 1 and overlapped.order.index("denoising views") < overlapped.order.index("UVs")
    given, waited = grid_mesh(), Recorder()
    given.corner_uvs = unwrapped.corner_uvs.copy()
    run_texture_job(request, given, waited, models)
    assert waited.uv_updates == 0
    assert np.array_equal(overlapped.textures[-1][0], waited.textures[-1][0])


def test_unknown_model_and_offline_weights_get_distinct_messages(tmp_path) -> None:
    with pytest.raises(ModelError) as err:
        load_prior("not a model", torch.device("cpu"))
    assert err.value.code == protocol.E_MODEL_NOT_FOUND and "Hugging Face id" in str(err.value)
    with pytest.raises(ModelError) as err:
        load_prior("kiln-tests/never-downloaded", torch.device("cpu"), offline=True)
    assert err.value.code == protocol.E_WEIGHTS_OFFLINE and "hf download" in str(err.value)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError) as err:
        load_prior(str(broken), torch.device("cpu"), offline=True)
    assert err.value.code == protocol.E_MODEL_NOT_FOUND and "broken.safetensors', which is on this machine" in \
        str(err.value) and "not on this machine" not in str(err.value)
    with pytest.raises(ModelError, match=r"is not a diffusers folder \(it has no model_index.json\): give the "
                                         "checkpoint file it holds, 'broken.safetensors', instead"):
        load_prior(str(tmp_path), torch.device("cpu"))


def test_a_mistyped_model_is_refused_with_the_loaded_one_kept(tmp_path, monkeypatch) -> None:
    """The cache made way (dropped the loaded model) before loading the next one: a typo in the
    model field cost the next job a reload of the model it had. So did a folder or file that is
    there but holds no weights (the folder above them, a picture picked in the file browser)."""
    models, events = ModelCache(), TextureEvents()
    (tmp_path / "style.png").write_bytes(b"not weights")
    (tmp_path / ".kiln-index.safetensors").write_bytes(b"an asset library's own index")
    tiny = models.get(JobRequest.from_fields({"prompt": "a crate", "model": "tiny"}), events)
    for typo in ("tiny2", "stable-diffusion-v1-5", "C:/no/such/model.safetensors"):
        with pytest.raises(ModelError, match=rf"unknown model '{typo}': it is not 'tiny'"):
            models.get(JobRequest.from_fields({"prompt": "a crate", "model": typo}), events)
    for part, typo in (("lora", "lcm-lora-sdv1-5"), ("vae", "~/no/vae.safetensors"), ("controlnet", "depth")):
        with pytest.raises(ModelError, match=r"unknown (LoRA|VAE|ControlNet) '.*': give a Hugging Face id such as"):
            models.get(JobRequest.from_fields({"prompt": "a crate", "model": "tiny", part: typo}), events)
    for part, there, message in (("lora", tmp_path / "style.png", r"LoRA '.*style.png' is a \.png file, not weights"),
                                 ("vae", tmp_path, r"folder '.*' holds no VAE \(no config.json, no weights file\)")):
        with pytest.raises(ModelError, match=message):
            models.get(JobRequest.from_fields({"prompt": "a crate", "model": "tiny", part: str(there)}), events)
    with pytest.raises(ModelError, match="is not a diffusers folder .*: give a diffusers folder"):
        models.get(JobRequest.from_fields({"prompt": "a crate", "model": str(tmp_path)}), events)
    assert list(models.priors.values()) == [tiny]
    from backend.prior import check_names, model_kind

    (tmp_path / "tiny").mkdir()  # a folder of that name where the CLI runs is not the model 'tiny'
    monkeypatch.chdir(tmp_path)
    check_names("tiny")
    (tmp_path / "FINE-TUNE.SAFETENSORS").write_bytes(b"")  # as some Windows downloads name it
    assert [model_kind(m) for m in (str(tmp_path / "FINE-TUNE.SAFETENSORS"), str(tmp_path / "style.png"),
                                    "https://huggingface.co/org/model", "org/model")] == \
        ["checkpoint", None, "hub", "hub"]


def test_unload_pressed_while_a_model_loads_frees_it_after_its_job(monkeypatch) -> None:
    """Unload found nothing cached while a model loaded (seconds, minutes with a download), said
    "none loaded", and the model then stayed in memory, VRAM and all."""
    import backend.jobs

    models, said = ModelCache(), []

    def loading(*args, **kwargs):
        said.extend(models.unload())  # the artist's Unload, from the connection's thread, mid-load
        return load_prior(*args, **kwargs)
    monkeypatch.setattr(backend.jobs, "load_prior", loading)
    prior = models.get(JobRequest.from_fields({"prompt": "a crate", "model": "tiny"}), TextureEvents())
    assert prior.name == "tiny" and not models.priors  # the job has its model; the cache keeps none
    assert said == ["tiny (loading now: freed when its job ends)"]


def hub_error(kind: type, message: str) -> Exception:
    """huggingface_hub's own error, with its own words, without the HTTP response it is built from
    (whose class changes with its version)."""
    error = kind.__new__(kind)
    Exception.__init__(error, message)
    return error


def test_gated_and_private_models_and_a_full_disk_say_how_to_get_past_them() -> None:
    """Both models come as a 401 from the hub; the gated one's words ("Please log in") named no way
    to. A full disk was "could not load" the model."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from backend.prior import explain_load_error

    url = "https://huggingface.co/org/gated/resolve/main/model_index.json"
    gated = hub_error(GatedRepoError, f"401 Client Error.\n\nCannot access gated repo for url {url}.\nAccess to model "
                      "org/gated is restricted. You must have access to it and be authenticated to access it. Please "
                      "log in.")
    hidden = hub_error(RepositoryNotFoundError, f"401 Client Error.\n\nRepository Not Found for url: {url}.\nIf you "
                       "are trying to access a private or gated repo, make sure you are authenticated.")
    message = str(explain_load_error(gated, "model 'org/gated'", offline=False))
    assert message.startswith("model 'org/gated' is gated on the Hugging Face hub: accept its terms on its page "
                              "there, then log this machine in (`hf auth login`")
    message = str(explain_load_error(hidden, "model 'org/privat'", offline=False))
    assert message.startswith("model 'org/privat' was not found: check the spelling of the id or path; a private "
                              "model also needs this machine logged in (`hf auth login`")
    full = OSError(28, "No space left on device")
    assert "the disk ran out of space downloading model 'org/big' into the Hugging Face cache (" in \
        str(explain_load_error(full, "model 'org/big'", offline=False))


def test_a_local_diffusers_folder_loads_through_the_real_loading_code(tmp_path) -> None:
    """Save the tiny model as a diffusers folder (what a user downloads) and load it back."""
    from diffusers import DDIMScheduler

    tiny = load_prior("tiny", torch.device("cpu"))
    save_pipeline(tiny, tmp_path / "model", DDIMScheduler(**SD_SCHEDULER))
    loaded = load_prior(str(tmp_path / "model"), torch.device("cpu"))
    assert not loaded.pipeline_check
    embeds = loaded.encode_prompt("a vase", "")
    assert torch.allclose(embeds, tiny.encode_prompt("a vase", ""))
    assert torch.allclose(loaded.schedule.alphas_cumprod, tiny.schedule.alphas_cumprod)
    assert loaded.resolution == tiny.resolution == 64

    # Folders downloaded as the fp16 variant hold only *.fp16.safetensors, which diffusers reads
    # only when told the variant: a model's and a part's (here its VAE) load all the same.
    save_pipeline(tiny, tmp_path / "fp16", DDIMScheduler(**SD_SCHEDULER), variant="fp16")
    tiny.vae.save_pretrained(tmp_path / "vae-fp16", variant="fp16")
    assert not list((tmp_path / "fp16" / "unet").glob("*model.safetensors"))
    half = load_prior(str(tmp_path / "fp16"), torch.device("cpu"), vae=str(tmp_path / "vae-fp16"))
    assert torch.allclose(half.encode_prompt("a vase", ""), embeds)


def test_models_of_other_architectures_are_refused_before_their_weights_are_fetched(tmp_path, monkeypatch) -> None:
    """SDXL, inpainting and diffusion-transformer models load as a Stable Diffusion pipeline (or
    half do) and then failed at the first denoising step with a shape error. They are refused by
    their configs: a saved SDXL-like folder, and a hub id whose cache holds only the configs (as the
    first kilobytes of a download would), saying what to pick instead."""
    import huggingface_hub.constants
    from diffusers import DDIMScheduler, UNet2DConditionModel

    tiny = load_prior("tiny", torch.device("cpu"))
    torch.manual_seed(0)
    inpainting = UNet2DConditionModel.from_config(dict(tiny.unet.config, in_channels=9))
    save_pipeline(tiny, tmp_path / "inpainting", DDIMScheduler(**SD_SCHEDULER), unet=inpainting)
    with pytest.raises(ModelError, match="is an inpainting model .* pick the model it was made from"):
        load_prior(str(tmp_path / "inpainting"), torch.device("cpu"))

    def cached_repo(repo: str, files: dict[str, dict]) -> None:
        folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0" * 40)
        for name, content in files.items():
            (folder / "snapshots" / ("0" * 40) / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / "snapshots" / ("0" * 40) / name).write_text(json.dumps(content))

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    unet = dict(tiny.unet.config)
    cached_repo("kiln-tests/xl", {"model_index.json": {"_class_name": "StableDiffusionXLPipeline", "unet": [],
                                                       "text_encoder_2": []},
                                  "unet/config.json": dict(unet, addition_embed_type="text_time")})
    cached_repo("kiln-tests/dit", {"model_index.json": {"_class_name": "StableDiffusion3Pipeline", "transformer": []}})
    for name in ("kiln-tests/xl", "https://huggingface.co/kiln-tests/xl", "https://huggingface.co/kiln-tests/xl/tree/main"):
        with pytest.raises(ModelError, match="is an SDXL model .* pick an SD 1.x or 2.x model"):
            load_prior(name, torch.device("cpu"), offline=True)  # an id, or its page's address
    with pytest.raises(ModelError, match="is a StableDiffusion3Pipeline, not Stable Diffusion 1.x/2.x"):
        load_prior("kiln-tests/dit", torch.device("cpu"), offline=True)


def test_a_models_first_download_is_announced_as_such(tmp_path, monkeypatch) -> None:
    """SD's first load fetches gigabytes: the job's phase says so rather than 'loading' for minutes.
    Only a Hugging Face id missing from the cache, with the hub in reach, is a download."""
    import huggingface_hub.constants

    from backend import jobs
    from backend.prior import first_download

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    snapshot = tmp_path / "hub" / "models--kiln-tests--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert first_download("kiln-tests/never-fetched", offline=False)
    assert not first_download("kiln-tests/cached", offline=False)
    assert not first_download("kiln-tests/never-fetched", offline=True)
    assert not first_download("tiny", offline=False) and not first_download(str(tmp_path), offline=False)

    def no_network(model, **_):  # what a download would do is beside the point here
        raise ModelError(protocol.E_WEIGHTS_OFFLINE, "stopped before the download")
    monkeypatch.setattr(jobs, "load_prior", no_network)
    rec = Recorder()
    with pytest.raises(ModelError):
        ModelCache().get(JobRequest.from_fields({"prompt": "a vase", "model": "kiln-tests/never-fetched",
                                                 "controlnet": "kiln-tests/cached", "lora": "kiln-tests/new-lora"}),
                         rec)
    assert rec.progress_calls == [(0, 1, "downloading kiln-tests/never-fetched and kiln-tests/new-lora (first use: "
                                          "gigabytes, which takes minutes)")]


def test_single_checkpoints_are_checked_by_their_header_and_say_what_they_need_offline(tmp_path, monkeypatch) -> None:
    """A single .safetensors file is judged by its tensor names and shapes before gigabytes are
    read: SDXL, inpainting and Flux checkpoints, and a LoRA or VAE put in the model field, are
    named. An SD 1.5 checkpoint offline says what it lacks: diffusers reads a single file with its
    base model's configuration and tokenizer from the hub, which the file does not hold."""
    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    sd15 = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1, 768),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}
    cases = {
        "inpainting": ({**sd15, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 9, 1, 1)},
                       "is an inpainting model"),
        "xl": ({**sd15, "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, "is an SDXL model"),
        "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(1)}, "is a diffusion transformer"),
        "lora": ({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 1),
                  "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.zeros(())},
                 r"is a LoRA, not a model: put it in the LoRA field \(--lora in the CLI\)"),
        "vae": ({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1)},
                "is a VAE, not a model"),
    }
    for name, (weights, message) in cases.items():
        save_file(weights, tmp_path / f"{name}.safetensors")
        with pytest.raises(ModelError, match=message):
            load_prior(str(tmp_path / f"{name}.safetensors"), torch.device("cpu"), offline=True)
    save_file(sd15, tmp_path / "sd15.safetensors")
    with pytest.raises(ModelError) as err:
        load_prior(str(tmp_path / "sd15.safetensors"), torch.device("cpu"), offline=True)
    assert err.value.code == protocol.E_WEIGHTS_OFFLINE
    assert "is on this machine, but reading it needs files it does not hold" in str(err.value)


def test_an_offline_job_reaches_for_no_network_on_a_backend_started_online(tmp_path, monkeypatch) -> None:
    """A standing backend (started by hand, online) serving a Blender whose online access is off:
    diffusers reached the hub for a single checkpoint's configuration all the same, as it sets
    local_files_only aside when that configuration is not cached."""
    import socket

    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the environment allows the hub
    monkeypatch.delenv("HF_HUB_OFFLINE")
    reached = []

    def look_up(host, *_args, **_kwargs):  # never the network from a test: recorded and refused instead
        reached.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "the test looks up no host")
    monkeypatch.setattr(socket, "getaddrinfo", look_up)
    save_file({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1, 768),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)},
              tmp_path / "sd15.safetensors")
    from backend.embed import ClipEmbedder  # an index or search job's CLIP: transformers asked for an adapter
    with pytest.raises(ModelError) as err:
        ClipEmbedder.load("openai/clip-vit-base-patch32", True, torch.device("cpu"))
    assert err.value.code == protocol.E_WEIGHTS_OFFLINE and reached == []
    with pytest.raises(ModelError) as err:
        load_prior(str(tmp_path / "sd15.safetensors"), torch.device("cpu"), offline=True)
    assert err.value.code == protocol.E_WEIGHTS_OFFLINE and reached == []
    # A model fetched before loads offline as it is, still without a look-up.
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from backend.tiny_model import build_tiny_prior

    tiny = build_tiny_prior(torch.device("cpu"))
    snapshot = tmp_path / "empty-hub" / "models--kiln-tests--fetched" / "snapshots" / ("0" * 40)
    StableDiffusionPipeline(tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.unet, DDIMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert load_prior("kiln-tests/fetched", torch.device("cpu"), offline=True).unet.config.in_channels == 4
    assert reached == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # the hub again for the jobs that may use it


class TrainingCallback:
    """What a training run pickles into its .ckpt besides the weights (pytorch_lightning's
    ModelCheckpoint, say): unpickled for real, its module is imported and its code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


def test_a_training_runs_ckpt_is_read_weights_only_without_running_its_code(tmp_path, monkeypatch) -> None:
    """torch reads a .ckpt weights-only and refused one that holds any other object: diffusers said
    "unable to load weights", and Kiln "check that it is complete". Its other objects are now read
    as stand-ins, which run nothing; a pickle too old to be read that way is named as such."""
    import huggingface_hub.constants
    from diffusers.models.model_loading_utils import load_state_dict

    from backend.prior import _stand_ins

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    marker = tmp_path / "code-ran"
    weights = {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(3, 768),
               "model.diffusion_model.input_blocks.0.0.weight": torch.randn(1, 4, 1, 1)}
    trained = {"state_dict": weights, "global_step": 470000, "callbacks": {"ModelCheckpoint": TrainingCallback(marker)},
               "best_score": np.float64(0.12)}
    ckpt = tmp_path / "fine-tune.ckpt"
    torch.save(trained, ckpt)
    with pytest.raises(OSError, match="Unable to load weights"):
        load_state_dict(str(ckpt))  # as diffusers' single-file loaders read it
    with _stand_ins(ckpt):
        read = load_state_dict(str(ckpt))
    assert all(torch.equal(read["state_dict"][k], v) for k, v in weights.items()) and read["global_step"] == 470000
    assert not marker.exists()
    with pytest.raises(ModelError) as err:  # read, then wants its base model's configuration: offline here
        load_prior(str(ckpt), torch.device("cpu"), offline=True)
    assert err.value.code == protocol.E_WEIGHTS_OFFLINE and not marker.exists()
    # A VAE's .ckpt (sd-vae-ft-mse's original is one) was opened as safetensors: "header too large".
    vae = tmp_path / "vae-ft-mse.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}, "global_step": 840001,
                "callbacks": [TrainingCallback(marker)]}, vae)
    with pytest.raises(ModelError) as err:  # read; SD's VAE configuration comes from the hub
        load_prior("tiny", torch.device("cpu"), vae=str(vae), offline=True)
    assert err.value.code == protocol.E_WEIGHTS_OFFLINE and "config.json" in str(err.value) and not marker.exists()

    old = tmp_path / "old.ckpt"
    torch.save(trained, old, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelError, match="holds Python objects besides its weights that cannot be read without"):
        load_prior(str(old), torch.device("cpu"), offline=True)
    assert not marker.exists()


def gaussian_denoiser(schedule, predicts: str, mean: float = 0.4, std: float = 0.9):
    """The exact UNet for latents drawn from N(mean, std²) per element: what a trained model
    approximates, as noise (``epsilon``) or v (``v_prediction``)."""
    from types import SimpleNamespace

    def forward(sample, timestep, encoder_hidden_states=None, **_):
        a, s = schedule.coefficients(int(timestep))
        x0 = mean + a * std ** 2 / (a * a * std ** 2 + s * s) * (sample - a * mean)
        eps = (sample - a * x0) / s
        return SimpleNamespace(sample=eps if predicts == "epsilon" else a * eps - s * x0)
    return forward


@pytest.mark.parametrize("predicts", ["epsilon", "v_prediction"])
def test_a_single_checkpoints_parameterisation_is_read_from_its_yaml_or_found_by_one_call(
        tmp_path, monkeypatch, predicts) -> None:
    """A single file does not record whether its UNet predicts noise or v, and diffusers reads every
    SD 2 file as 2.1's 768² v model: a 2.x-base fine-tune (512², noise) made noise. A companion
    .yaml (A1111's convention) decides; without one, one UNet call at the last timestep does, and
    an SD 2 model's resolution follows (noise: 512², v: 768²)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from backend import prior as prior_module
    from backend.tiny_model import build_tiny_prior

    def single_file(path, dtype, offline):
        tiny = build_tiny_prior(torch.device("cpu"))
        tiny.unet.register_to_config(cross_attention_dim=1024)  # read as SD 2
        tiny.unet.forward = gaussian_denoiser(tiny.schedule, predicts)
        scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  prediction_type="v_prediction", clip_sample=False)  # diffusers' guess for SD 2
        return StableDiffusionPipeline(tiny.vae, tiny.text_encoder, tiny.tokenizer, tiny.unet, scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    monkeypatch.setattr(prior_module, "_from_single_file", single_file)
    checkpoint = tmp_path / "fine-tune.safetensors"
    save_file({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(1, 1024),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}, checkpoint)

    probed = load_prior(str(checkpoint), torch.device("cpu"))
    assert probed.prediction_type == predicts
    assert probed.resolution == (768 if predicts == "v_prediction" else 512) * 4 // 8  # the tiny VAE's factor 4

    other = "epsilon" if predicts == "v_prediction" else "v_prediction"
    yaml = 'model:\n  params:\n    parameterization: "v"\n' if other == "v_prediction" else "model:\n  params: {}\n"
    checkpoint.with_suffix(".yaml").write_text(yaml)
    assert load_prior(str(checkpoint), torch.device("cpu")).prediction_type == other


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def refused_cli(capsys, *args: str) -> str:
    """A CLI run that must be refused before any job starts, run in this process (a fresh one
    costs seconds each): exit status 2, and what it said on stderr."""
    from backend import cli

    capsys.readouterr()
    try:
        code = cli.main(list(args))
    except SystemExit as exited:  # argparse's own refusals
        code = exited.code
    err = capsys.readouterr().err
    assert code == 2, err
    return err


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C is a console event on Windows, not a signal to a group")
def test_ctrl_c_stops_the_cli_with_the_shells_status_and_no_traceback(tmp_path) -> None:
    """Ctrl+C reaches the whole foreground group: the CLI and its unwrapping child. It printed a
    page of torch's frames."""
    import signal

    cli = started_cli(tmp_path, start_new_session=True,
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's
    os.killpg(cli.pid, signal.SIGINT)
    seen = cli.communicate(timeout=60)[1]
    assert cli.returncode == 130 and seen.rstrip().endswith("kiln: texture interrupted (Ctrl+C)")
    assert "Traceback" not in seen and not (tmp_path / "out" / "ball.glb").exists()
    assert not list((tmp_path / "tmp").glob("kiln-unwrap-*"))


@pytest.mark.skipif(not (ROOT / ".venv").is_dir() or Path(sys.prefix) != ROOT / ".venv",
                    reason="the checkout's own environment, which `build.py setup` makes, is not the one running")
def started_cli(tmp_path: Path, **popen: object) -> subprocess.Popen:
    """A CLI job on a mesh without UVs (a child unwraps it, in a folder under ``tmp_path/tmp``),
    returned once it is under way."""
    import trimesh

    trimesh.creation.icosphere(subdivisions=5).export(tmp_path / "ball.obj")
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmp"))
    cli = subprocess.Popen([sys.executable, "-m", "backend", "texture", str(tmp_path / "ball.obj"), "--prompt", "a",
                            "--steps", "400", "--out", str(tmp_path / "out")], cwd=ROOT, env=env, text=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)
    seen = ""
    while "loading model" not in seen:
        seen += cli.stderr.read(1)
    return cli


@pytest.mark.skipif(sys.platform == "win32", reason="Windows ends a process without a signal to handle")
def test_a_killed_cli_cleans_up_its_unwrapping_child_and_folder(tmp_path) -> None:
    """A render farm's kill (SIGTERM) ended the CLI at once: its xatlas child ran on, and the
    child's folder, holding a copy of the mesh, stayed in the temporary folder for good."""
    cli = started_cli(tmp_path)
    cli.terminate()
    seen = cli.communicate(timeout=60)[1]
    assert cli.returncode == 128 + 15 and seen.rstrip().endswith("kiln: texture stopped (SIGTERM)")
    assert not list((tmp_path / "tmp").glob("kiln-unwrap-*"))


def test_the_checkouts_environment_runs_the_cli_from_any_folder(tmp_path) -> None:
    """A pipeline calls `.venv/bin/python -m backend` from its own folder: "No module named backend"."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "backend", "--version"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("Kiln "), result.stderr


def test_cli_textures_a_mesh_file_end_to_end(tmp_path) -> None:
    import trimesh
    from PIL import Image

    result = run_cli("texture", str(VASE), "--prompt", "a glazed vase", "--size", "512", "--steps", "1",
                     "--method", "SIR", "--out", str(tmp_path))  # as the README and the panel spell it
    assert result.returncode == 0, result.stderr
    assert "PIPELINE CHECK" in result.stdout
    summary = json.loads((tmp_path / "result.json").read_text())
    png = Image.open(summary["texture"])
    assert png.size == (512, 512) and np.asarray(png).std() > 1.0
    # Everything a rerun needs, the prompt and what it ran on included (it held model, seed and method).
    settings = summary["settings"]
    assert (settings["prompt"], settings["texture_size"], settings["steps"], settings["method"]) == \
        ("a glazed vase", 512, 1, "sir")
    assert json.loads(json.dumps(asdict(JobRequest.from_fields(settings)))) == settings  # and read back whole
    assert summary["device"] == "cpu" and summary["software"].startswith("Python 3.")
    glb = trimesh.load(summary["mesh"], force="mesh")
    assert len(glb.faces) == 2112 and glb.visual.uv is not None


def test_cli_search_refuses_a_count_that_lists_nothing() -> None:
    """--count 0 found nothing, which was reported as empty libraries."""
    import argparse

    from backend.cli import count_of_hits

    assert count_of_hits("3") == 3
    for text, why in (("0", "0 lists no asset: give 1 or more"), ("-2", "-2 lists no asset"), ("x", "not a whole")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            count_of_hits(text)


def test_cli_version_names_what_a_bug_report_needs() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("Kiln 0.1.0 (Python 3.")
    assert ", torch " in result.stdout and ", diffusers " in result.stdout


def test_a_mesh_far_from_its_files_origin_keeps_its_shape_and_place(tmp_path) -> None:
    """A georeferenced mesh (a vase a million units out): float32 positions would round its
    vertices by 0.06 units, merging half of them; Kiln keeps them relative to its centre and writes
    the GLB with that centre on its node, so the result sits where the file had it, unblurred. A
    mesh near its origin keeps the file's origin as its pivot."""
    import trimesh

    from backend.cli import write_result

    vertices = np.asarray(trimesh.load(VASE, force="mesh", process=False).vertices, np.float64)
    far = tmp_path / "far.obj"
    far.write_text("".join(f"v {x + 1e6:.17g} {y:.17g} {z - 2e6:.17g}\n" for x, y, z in vertices)
                   + "".join(line + "\n" for line in VASE.read_text().splitlines() if line.startswith("f ")))
    for path, shift in ((far, np.array([1e6, 0, -2e6])), (VASE, np.zeros(3))):
        mesh, _ = load_mesh_file(path)
        assert (mesh.origin is None) == (path == VASE)
        mesh.corner_uvs = np.zeros((mesh.triangle_count, 3, 2), np.float32)
        out = write_result(mesh, np.zeros((8, 8, 4), np.uint8), tmp_path / path.stem)
        scene = trimesh.load(out["mesh"])
        geometry = scene.dump()[0]
        placed = np.asarray(geometry.vertices)[geometry.faces].reshape(-1, 3) - shift
        corners = vertices[mesh.triangles].reshape(-1, 3)
        assert np.abs(placed - corners).max() < 1e-6
        assert (np.abs(scene.graph[scene.graph.nodes_geometry[0]][0][:3, 3] - shift) < 1).all()


def test_the_cli_glb_shows_the_texture_untinted_on_smooth_normals_and_keeps_a_files_pbr_maps(tmp_path) -> None:
    """The GLB a job writes: Base Color is the texture as made (trimesh's default material tinted
    it 0.4 grey, and glTF read its missing metallic factor as fully metal); normals are smooth
    across gentle edges and hard across sharp ones (glTF shades a mesh without normals flat); and a
    mesh file's own PBR material keeps its metal, roughness and normal map. Read back, a texture is
    tinted by its Base Color factor."""
    import struct
    from pathlib import Path

    import trimesh
    from PIL import Image

    from backend.assets import base_colour
    from backend.cli import write_result
    from backend.mesh import shaded_vertices

    def gltf(path: Path) -> dict:
        data = path.read_bytes()
        return json.loads(data[20:20 + struct.unpack("<I", data[12:16])[0]])

    vase, _ = load_mesh_file(VASE)
    vase.corner_uvs = np.zeros((vase.triangle_count, 3, 2), np.float32)
    box = trimesh.creation.box()
    cube = Mesh(np.asarray(box.vertices, np.float32), np.asarray(box.faces), np.zeros((12, 3, 2), np.float32),
                name="box")
    for mesh in (vase, cube):
        written = Path(write_result(mesh, np.zeros((8, 8, 4), np.uint8), tmp_path / mesh.name)["mesh"])
        header = gltf(written)
        assert "NORMAL" in header["meshes"][0]["primitives"][0]["attributes"]
        pbr = header["materials"][0]["pbrMetallicRoughness"]
        assert pbr["metallicFactor"] == 0 and pbr.get("baseColorFactor", [1, 1, 1, 1]) == [1, 1, 1, 1]
        out = trimesh.load(written, force="mesh", process=False)
        normals, faces = np.asarray(out.vertex_normals), np.asarray(out.faces)
        face_normals = np.asarray(out.face_normals)
        off_face = np.degrees(np.arccos(np.clip((normals[faces] * face_normals[:, None]).sum(-1), -1, 1)))
        assert np.allclose(out.vertices[faces], mesh.positions[mesh.triangles], atol=1e-6)
        if mesh is cube:
            assert len(out.vertices) == 24 and off_face.max() < 1e-3  # hard edges: each side flat
        else:
            assert len(out.vertices) < 1.5 * len(mesh.positions) and np.median(off_face) > 1  # smooth
    sliver = Mesh(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]], np.float32), np.array([[0, 1, 2], [0, 1, 3]]),
                  np.zeros((2, 3, 2), np.float32))  # its second face has no area, so no normal of its own
    assert np.allclose(np.linalg.norm(shaded_vertices(sliver)[2], axis=1), 1)  # glTF wants unit normals
    normal_map = Image.new("RGB", (4, 4), (128, 128, 255))
    material = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.new("RGB", (4, 4), (200, 200, 200)),
                                                   baseColorFactor=[0.5, 0.5, 0.5, 1.0], metallicFactor=1.0,
                                                   roughnessFactor=0.2, normalTexture=normal_map)
    box.visual = trimesh.visual.TextureVisuals(uv=np.asarray(box.vertices)[:, :2] + 0.5, material=material)
    box.export(tmp_path / "metal.glb")
    mesh, source = load_mesh_file(tmp_path / "metal.glb")
    # Tinted as glTF viewers and Blender show it, in linear light: 147, not the bytes halved (100).
    assert torch.allclose(base_colour(source), torch.tensor(147 / 255))
    written = Path(write_result(mesh, np.zeros((8, 8, 4), np.uint8), tmp_path / "metal", source)["mesh"])
    header = gltf(written)
    pbr = header["materials"][0]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 1 and pbr["roughnessFactor"] == pytest.approx(0.2)
    assert "normalTexture" in header["materials"][0] and pbr.get("baseColorFactor", [1, 1, 1, 1]) == [1, 1, 1, 1]


def test_loading_diffusers_pipelines_does_not_send_artists_after_torchvision() -> None:
    """Every job with a real model (and every LoRA) imports diffusers' pipelines, at which
    transformers printed twice that torchvision is not installed and to install it: Kiln needs none."""
    loads = "import backend.prior; from diffusers import StableDiffusionPipeline; import transformers; " \
            "transformers.CLIPImageProcessor"
    result = subprocess.run([sys.executable, "-c", loads], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0 and "torchvision" not in result.stderr, result.stderr


def test_console_progress_is_rate_limited_but_shows_a_phase_that_holds_the_count(capsys) -> None:
    """A terminal gets a few frames of the bar for a burst of updates, not one per update; a phase
    that holds the count (unwrapping) is on the bar at once, though no update follows to show it.
    A log (stderr not a terminal) gets plain lines, no carriage returns: one for each new phase and
    at most one every LOG_EVERY_S besides, though SIR's phases alternate at every few updates."""
    from backend import cli

    with cli.ConsoleEvents(interactive=True) as events:
        for done in range(1, 501):
            events.progress(done, 1000, "reconstructing")
        events.progress(500, 1000, "unwrapping UVs (xatlas)")
    frames = [f for f in capsys.readouterr().err.split("\r") if f.strip()]
    assert len(frames) < 20
    assert "unwrapping UVs (xatlas)" in frames[-1] and "500/1000" in frames[-1]
    events = cli.ConsoleEvents()  # pytest's captured stderr is no terminal
    for done in range(1, 501):
        events.progress(done, 1000, "denoising views" if done % 20 < 10 else "reconstructing texture")
    events.progress(500, 1000, "unwrapping UVs (xatlas)")
    events.log("PIPELINE CHECK")
    log = capsys.readouterr().err
    assert "\r" not in log and log.splitlines() == [
        "kiln: denoising views 1/1000 (0%, 0 s)", "kiln: reconstructing texture 10/1000 (1%, 0 s)",
        "kiln: unwrapping UVs (xatlas) 500/1000 (50%, 0 s)", "PIPELINE CHECK"]
    events.logged -= cli.LOG_EVERY_S  # as if that long had passed
    events.progress(501, 1000, "reconstructing texture")
    assert capsys.readouterr().err.startswith("kiln: reconstructing texture 501/1000 (50%")
    for _ in range(2):  # the end shows, once
        events.progress(1000, 1000, "reconstructing texture")
    assert capsys.readouterr().err.splitlines() == ["kiln: reconstructing texture 1000/1000 (100%, 0 s)"]


def test_cli_fails_loudly_on_bad_input(tmp_path, capsys) -> None:
    result = run_cli("texture", str(VASE), "--prompt", "", "--out", str(tmp_path))
    assert result.returncode == 2 and "prompt is empty" in result.stderr  # the process's own exit status
    assert "does not exist" in refused_cli(capsys, "texture", str(tmp_path / "missing.obj"), "--prompt", "x",
                                           "--out", str(tmp_path))
    assert "out of range" in refused_cli(capsys, "texture", str(VASE), "--prompt", "x", "--size", "100", "--out",
                                         str(tmp_path))
    assert "unknown VAE 'no such vae'" in refused_cli(capsys, "texture", str(VASE), "--prompt", "x", "--vae",
                                                      "no such vae", "--out", str(tmp_path))
    # Checked before any model loads, so a long job is not lost at its end.
    blocker = tmp_path / "a file"
    blocker.write_text("")
    err = refused_cli(capsys, "texture", str(VASE), "--prompt", "x", "--out", str(blocker / "out"))
    assert "cannot make the --out folder" in err and "loading model" not in err
    from backend.cli import output_folder
    with pytest.raises(JobError, match="'.*a file' is a file, and Kiln writes a folder of results"):
        output_folder(str(blocker))
    err = refused_cli(capsys, "generate", "--prompt", "x", "--reference", str(tmp_path / "gone.glb"), "--out",
                      str(tmp_path))
    assert "gone.glb' does not exist" in err and "loading model" not in err
    assert "gone' is not a folder" in refused_cli(capsys, "texture", str(VASE), "--prompt", "x", "--library",
                                                  str(tmp_path / "gone"), "--out", str(tmp_path))
    # --out the mesh's own folder: its .glb would be replaced by the result.
    import trimesh
    trimesh.creation.box().export(tmp_path / "box.glb")
    kept = (tmp_path / "box.glb").read_bytes()
    err = refused_cli(capsys, "texture", str(tmp_path / "box.glb"), "--prompt", "x", "--out", str(tmp_path))
    assert "would write the result 'box.glb' over the input file" in err
    assert (tmp_path / "box.glb").read_bytes() == kept and "loading model" not in err


def test_out_of_gpu_memory_names_low_vram_first_and_other_failures_keep_their_traceback(
        tmp_path, monkeypatch, capsys) -> None:
    """The CLI (and the server, through the same ``describe_failure``) turns a CUDA out-of-memory
    failure into exit code 2 and the fix; Low VRAM comes first unless the job already had it. So
    does a card with no kernels in torch's build."""
    import torch

    from backend import cli

    def oom(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "run_texture_job", oom)
    job = ["texture", str(VASE), "--prompt", "x", "--out", str(tmp_path)]
    assert cli.main(job) == 2
    err = capsys.readouterr().err
    assert "ran out of memory: turn on Low VRAM" in err and "--low-vram" in err and "Tried to allocate" in err
    assert cli.main([*job, "--low-vram"]) == 2
    err = capsys.readouterr().err
    assert "even in Low VRAM mode: choose a smaller texture size" in err and "turn on" not in err

    def no_kernel(*_args, **_kwargs):  # a card its torch has no kernels for, not seen coming
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(cli, "run_texture_job", no_kernel)
    assert cli.main(job) == 2
    assert "this GPU has no kernels in the backend's torch" in capsys.readouterr().err

    def bug(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "run_texture_job", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(job)


def small_card(prior, tried: list):
    """The prior's ``predict_eps`` as on a card too small for full batches: out of memory unless
    Low VRAM mode bounds them; ``tried`` gets each call's batch limit."""
    import torch

    predict = prior.predict_eps

    def predict_eps(*args, **kwargs):
        tried.append(prior.batch_limit)
        if prior.batch_limit is None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return predict(*args, **kwargs)
    return predict_eps


def test_a_job_out_of_gpu_memory_runs_again_in_low_vram_mode_to_the_same_texture(monkeypatch) -> None:
    """A card a little too small for the job: the GPU runs out of memory, the job says so and runs
    again in Low VRAM mode, whose smaller batches give the texture the job would have given. Out
    of memory there too, it fails with the remaining fixes; any other failure is not retried."""
    import torch

    from backend import protocol
    from backend.jobs import JobError

    models = ModelCache()
    request = JobRequest.from_fields({"prompt": "a vase", "texture_size": 512, "steps": 1})
    prior = models.get(request, Recorder())
    predict, tried = prior.predict_eps, []
    monkeypatch.setattr(prior, "predict_eps", small_card(prior, tried))
    events = Logged()
    texture = run_texture_job(request, grid_mesh(), events, models)
    assert tried[0] is None and tried[1] is not None
    assert any("running the job again in Low VRAM mode" in line for line in events.lines)
    monkeypatch.setattr(prior, "predict_eps", predict)
    low = run_texture_job(JobRequest.from_fields({"prompt": "a vase", "texture_size": 512, "steps": 1,
                                                  "low_vram": True}), grid_mesh(), Recorder(), models)
    assert torch.allclose(texture, low, atol=1e-5)

    def no_card(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(prior, "predict_eps", no_card)
    with pytest.raises(JobError, match="even in Low VRAM mode: choose a smaller texture size") as failed:
        run_texture_job(request, grid_mesh(), Logged(), models)
    assert failed.value.code == protocol.E_OUT_OF_MEMORY

    def bug(*_args, **_kwargs):
        tried.append("bug")
        raise RuntimeError("a bug")
    tried.clear()
    monkeypatch.setattr(prior, "predict_eps", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        run_texture_job(request, grid_mesh(), Logged(), models)
    assert tried == ["bug"]


def test_generating_out_of_gpu_memory_runs_again_in_low_vram_mode(monkeypatch) -> None:
    from backend.jobs import run_generate_job

    models = ModelCache()
    request = JobRequest.from_fields({"prompt": "a stool", "task": "generate"})
    prior = models.get(request, Recorder())
    tried: list = []
    monkeypatch.setattr(prior, "predict_eps", small_card(prior, tried))
    result = run_generate_job(request, Recorder(), models)
    assert tried[0] is None and set(tried[1:]) == {prior.batch_limit} and result.mesh.triangle_count > 0


def test_every_setting_the_panel_accepts_the_backend_accepts_too() -> None:
    """The panel's limits and the backend's checks come from the protocol's one set of constants.
    Steps above 500 were refused once, though the panel offered up to 5,000 and SDS's preset runs 1,000."""
    from backend import protocol

    request = JobRequest.from_fields({"prompt": "a vase", "method": "sds", "steps": protocol.MAX_STEPS,
                                      "guidance": protocol.MAX_GUIDANCE, "strength": protocol.MIN_STRENGTH,
                                      "texture_size": protocol.MAX_TEXTURE_SIZE})
    assert request.config().iterations == protocol.MAX_STEPS
    assert request.config(refine=True).guidance == protocol.MAX_GUIDANCE


def test_cli_refines_the_texture_a_mesh_file_carries(tmp_path, capsys) -> None:
    first = run_cli("texture", str(VASE), "--prompt", "a vase", "--size", "512", "--steps", "1", "--out",
                    str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr
    glb = tmp_path / "a" / "vase.glb"
    again = run_cli("texture", str(glb), "--prompt", "a vase", "--size", "512", "--steps", "1", "--refine",
                    "--strength", "0.2", "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "b" / "vase_texture.png").is_file()
    assert "no texture to refine" in refused_cli(capsys, "texture", str(VASE), "--prompt", "a vase", "--refine",
                                                 "--out", str(tmp_path / "c"))
    # An OBJ copied without its .mtl: refused saying so, not refined from the grey trimesh makes up.
    moved = tmp_path / "moved.obj"
    moved.write_text("mtllib moved.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nvt 0 0\nvt 1 0\nvt 0 1\n"
                     "f 1/1 2/2 3/3\nf 1/1 2/2 4/3\nf 1/1 3/2 4/3\nf 2/1 3/2 4/3\n")
    # A file with UVs only on some parts: refining cannot lie on the others; a blank start unwraps.
    import trimesh
    from PIL import Image

    from backend.cli import partial_uv_map

    box, ball = trimesh.creation.box(), trimesh.creation.icosphere(1).apply_translation((3, 0, 0))
    box.visual = trimesh.visual.TextureVisuals(uv=np.asarray(box.vertices)[:, :2] + 0.5, image=Image.new("RGB", (4, 4)))
    trimesh.Scene({"Box": box, "Ball": ball}).export(tmp_path / "mixed.glb")
    mixed = refused_cli(capsys, "texture", str(tmp_path / "mixed.glb"), "--prompt", "a vase", "--refine", "--out",
                        str(tmp_path / "m"))
    assert "its part 'Ball' has no UV map, so the texture to refine cannot lie on it" in mixed, mixed
    args = argparse.Namespace(mesh="mixed.glb", refine=False, init_texture=None, repaint_mask=None, strength=None)
    mesh, loaded = load_mesh_file(tmp_path / "mixed.glb")
    assert mesh.corner_uvs is not None
    partial_uv_map(args, mesh, loaded)
    assert mesh.corner_uvs is None  # unwrapped whole
    grey = refused_cli(capsys, "texture", str(moved), "--prompt", "a vase", "--refine", "--out", str(tmp_path / "g"))
    assert f"its material library 'moved.mtl' is not in {tmp_path}: put the file there" in grey, grey
    # A texture tiled by KHR_texture_transform: trimesh would read it 1:1 on the UVs, so it is refused.
    data = glb.read_bytes()
    length = struct.unpack("<I", data[12:16])[0]
    header = json.loads(data[20:20 + length])
    header["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"]["extensions"] = {
        "KHR_texture_transform": {"scale": [4, 4]}}
    chunk = json.dumps(header).encode()
    chunk += b" " * (-len(chunk) % 4)
    rest = data[20 + length:]
    tiled = tmp_path / "tiled.glb"
    tiled.write_bytes(b"glTF" + struct.pack("<II", 2, 20 + len(chunk) + len(rest)) + struct.pack("<I", len(chunk))
                      + b"JSON" + chunk + rest)
    refused = refused_cli(capsys, "texture", str(tiled), "--prompt", "a vase", "--refine", "--out", str(tmp_path / "t"))
    assert "placed by KHR_texture_transform" in refused, refused
    assert "strength 3.0 is out of range" in refused_cli(capsys, "texture", str(glb), "--prompt", "a vase",
                                                         "--refine", "--strength", "3", "--out", str(tmp_path))
    # Options that only refining reads are never dropped without a word: --init-texture refines,
    # --strength on a blank start is refused. Both fail before any model loads.
    assert "cannot read --init-texture" in refused_cli(capsys, "texture", str(glb), "--prompt", "a vase",
                                                       "--init-texture", str(tmp_path / "gone.png"), "--out",
                                                       str(tmp_path / "d"))
    blank = refused_cli(capsys, "texture", str(glb), "--prompt", "a vase", "--strength", "0.3", "--out",
                        str(tmp_path / "e"))
    assert "add --refine" in blank and "loading model" not in blank


def test_a_texture_or_mask_pillow_cannot_read_says_which_formats_it_can(tmp_path) -> None:
    from dataclasses import replace

    from backend.cli import read_texture, repaint_faces

    exr = tmp_path / "paint.exr"
    exr.write_bytes(b"v/1\x01" + bytes(64))  # OpenEXR's magic number, as a VFX pipeline writes them
    with pytest.raises(JobError, match=r"cannot read --init-texture: .*paint.exr.* \(Kiln reads PNG, JPEG, .* save an "
                                       r"EXR or HDR as a 16-bit PNG\)"):
        read_texture(str(exr))
    with pytest.raises(JobError, match=r"cannot read --repaint-mask: .*save an EXR or HDR as a 16-bit PNG"):
        mesh = grid_mesh()
        repaint_faces(str(exr), replace(mesh, corner_uvs=np.zeros((len(mesh.triangles), 3, 2), np.float32)))


def test_cli_refines_a_udim_texture_tile_by_tile(tmp_path, capsys) -> None:
    """--init-texture paint.<UDIM>.png: each face starts from its own tile's file, in its tile's
    cell of the texture, which the .glb reads through its UVs."""
    import trimesh
    from PIL import Image

    mesh, _ = load_mesh_file(VASE)
    unwrap(mesh)
    corners = mesh.corner_uvs * 0.9 + 0.05  # clear of the tile's edges
    upper = mesh.positions[mesh.triangles].mean(1)[:, 1] > np.median(mesh.positions[:, 1])
    corners[upper, :, 0] += 1  # the vase's upper half in tile 1002
    positions = mesh.positions[mesh.triangles].reshape(-1, 3)
    trimesh.Trimesh(positions, np.arange(len(positions)).reshape(-1, 3),
                    visual=trimesh.visual.TextureVisuals(uv=corners.reshape(-1, 2)), process=False).export(
        tmp_path / "udim.obj")
    for number, colour in ((1001, (255, 0, 0)), (1002, (0, 0, 255))):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"paint.{number}.png")
    result = run_cli("texture", str(tmp_path / "udim.obj"), "--prompt", "a vase", "--size", "512", "--steps", "1",
                     "--strength", "0.05", "--init-texture", str(tmp_path / "paint.<UDIM>.png"), "--out",
                     str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "UDIM tiles 1001, 1002" in result.stderr
    out = trimesh.load(tmp_path / "out" / "udim.glb", force="mesh", process=False)
    cells = torch.as_tensor(np.asarray(out.visual.uv, np.float32)[np.asarray(out.faces)].mean(1))
    image = np.asarray(Image.open(tmp_path / "out" / "udim_texture.png").convert("RGB"), np.float32)[::-1] / 255
    colours = sample_image(torch.from_numpy(image.copy()).permute(2, 0, 1), cells)
    blue = (colours[:, 2] > colours[:, 0]).numpy()
    assert (blue == upper).mean() > 0.98  # each face shows its own tile's colour, not the other's
    assert "no tile files match" in refused_cli(capsys, "texture", str(tmp_path / "udim.obj"), "--prompt", "a vase",
                                                "--init-texture", str(tmp_path / "none.<UDIM>.png"), "--out",
                                                str(tmp_path / "bad"))


def test_textures_and_masks_of_any_bit_depth_keep_their_range(tmp_path) -> None:
    """A 16-bit grey PNG (as painters export masks and some textures), a float TIFF and a palette
    with transparency read as the same [0, 1] values as an 8-bit RGB image of the same picture,
    rows bottom-up: PIL's own conversion to RGB clips 16-bit values at 255, all but white."""
    import warnings

    from PIL import Image

    from backend.assets import image_rgb

    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (32, 1))  # dark left, light right
    ramp[0] = 0  # the top row black
    wide = Image.fromarray(np.round(ramp * 65535).astype(np.uint16))
    wide.save(tmp_path / "wide.png")
    Image.fromarray(ramp, "F").save(tmp_path / "float.tif")
    grey = Image.fromarray(np.round(ramp * 255).astype(np.uint8), "L")
    grey.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png",
                                                                         transparency=bytes([255] * 256))
    eight = image_rgb(grey)
    assert eight.shape == (32, 64, 3) and (eight[-1] == 0).all()  # the image's top row is the last, as UVs run
    for name in ("wide.png", "float.tif", "pal.png"):
        image = Image.open(tmp_path / name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rgb = image_rgb(image)
        assert np.abs(rgb - eight).max() < 1.5 / 255, (name, image.mode)


def test_cli_repaints_the_faces_a_mask_marks_white(tmp_path, capsys) -> None:
    """--repaint-mask: a pipeline's mask in texture space picks the faces to repaint (those whose
    UV centre lies on white); every other face's texel in the output is the input's. A mask dark
    under every face is refused before any model loads."""
    import trimesh
    from PIL import Image

    mesh, _ = load_mesh_file(VASE)
    unwrap(mesh)
    positions = mesh.positions[mesh.triangles].reshape(-1, 3)
    trimesh.Trimesh(positions, np.arange(len(positions)).reshape(-1, 3),
                    visual=trimesh.visual.TextureVisuals(uv=mesh.corner_uvs.reshape(-1, 2)), process=False).export(
        tmp_path / "vase.obj")
    stripes = np.zeros((512, 512, 3), np.uint8)
    stripes[:, ::8, 0], stripes[..., 2] = 255, 128
    Image.fromarray(stripes).save(tmp_path / "paint.png")
    mask = np.zeros((512, 512), np.uint8)
    mask[:, :256] = 255  # the left half of the UV square
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = run_cli("texture", str(tmp_path / "vase.obj"), "--prompt", "a vase", "--size", "512", "--steps", "2",
                     "--strength", "1", "--init-texture", str(tmp_path / "paint.png"), "--repaint-mask",
                     str(tmp_path / "mask.png"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    out = trimesh.load(tmp_path / "out" / "vase.glb", force="mesh", process=False)
    centres = np.asarray(out.visual.uv, np.float32)[np.asarray(out.faces)].mean(1)
    texel = (centres.clip(0, 1 - 1e-6) * 512).astype(int)
    image = np.asarray(Image.open(tmp_path / "out" / "vase_texture.png").convert("RGB"))[::-1]
    now, before = image[texel[:, 1], texel[:, 0]], stripes[::-1][texel[:, 1], texel[:, 0]]
    left = centres[:, 0] < 0.5
    assert (now[~left] == before[~left]).all(axis=1).mean() > 0.99
    assert (np.abs(now[left].astype(int) - before[left]).max(axis=1) > 8).mean() > 0.5
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "dark.png")
    dark = refused_cli(capsys, "texture", str(tmp_path / "vase.obj"), "--prompt", "a vase", "--init-texture",
                       str(tmp_path / "paint.png"), "--repaint-mask", str(tmp_path / "dark.png"), "--out",
                       str(tmp_path))
    assert "dark under every face's UV centre" in dark and "loading model" not in dark


def test_single_branch_predictions_match_the_batched_pair() -> None:
    """Inversion asks only for ε_uncond, guidance-free models only for ε_cond: each must equal
    its half of the batched CFG pair."""
    from backend.cameras import orbit
    from backend.prior import Views

    prior = load_prior("tiny", torch.device("cpu"))
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = prior.encode_prompt("a vase", "blurry")
    views = Views(orbit(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), [0.0, 120.0, 240.0], [0.0] * 3, "y"))
    uncond, cond = prior.predict_eps(x, 400, embeds, views)
    only_uncond = prior.predict_eps(x, 400, embeds, views, "uncond")
    only_cond = prior.predict_eps(x, 400, embeds, views, "cond")
    assert only_uncond[1] is None and only_cond[0] is None
    assert torch.allclose(only_uncond[0], uncond, atol=1e-5) and torch.allclose(only_cond[1], cond, atol=1e-5)


def test_sampling_from_pure_noise_skips_the_encoder_and_draws_the_same_targets() -> None:
    """SIR's first pass starts from noise, so it needs only the latents' shape: no VAE encode. A
    plug-in prior that cannot say the shape is asked to encode instead, with the same targets."""
    from backend.cameras import orbit
    from backend.prior import Views
    from backend.sir import denoise

    prior = load_prior("tiny", torch.device("cpu"))
    images = torch.rand(2, 3, prior.resolution, prior.resolution, generator=torch.Generator().manual_seed(1))
    assert prior.latent_shape(images) == prior.encode(images).shape

    class Counting:
        """The tiny prior, counting encoder passes; without ``latent_shape`` unless told."""

        def __init__(self, shape: bool) -> None:
            self.encodes, self.shape = 0, shape

        def __getattr__(self, name: str):
            if name == "latent_shape" and not self.shape:
                raise AttributeError(name)
            return getattr(prior, name)

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            self.encodes += 1
            return prior.encode(x)

    cfg = PRESETS["sir"]["pipeline-check"]
    views = Views(orbit(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), [0.0, 180.0], [0.0] * 2, "y"))
    embeds = prior.stack_prompts([prior.encode_prompt("a vase", "")] * 2)
    targets = {}
    for shape in (True, False):
        counting = Counting(shape)
        targets[shape] = denoise(counting, cfg, images, float(prior.schedule.num_train_timesteps), views, embeds,
                                 torch.Generator().manual_seed(7), lambda: False)
        assert counting.encodes == (0 if shape else 1)
    assert torch.equal(targets[True], targets[False])
    counting = Counting(True)
    denoise(counting, cfg, images, 0.5 * prior.schedule.num_train_timesteps, views, embeds,
            torch.Generator().manual_seed(7), lambda: False)
    assert counting.encodes == 1  # from a partly noised view the encoder is needed


def test_turbo_preset_runs_guidance_free() -> None:
    request = JobRequest.from_fields({"prompt": "a vase", "model": "tiny", "texture_size": 512,
                                          "preset": "turbo", "steps": 1})
    cfg = request.config()
    assert cfg.guidance == 1.0 and cfg.ddim_steps == 4
    rec = Recorder()
    run_texture_job(request, grid_mesh(), rec, ModelCache())
    assert rec.textures[-1][1]


def save_pipeline(prior, folder, scheduler, unet=None, variant=None) -> None:
    """A prior's parts as the diffusers folder a user would download."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer,
                            unet=unet or prior.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder, variant=variant)


class Logged(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def log(self, text):
        self.lines.append(text)


def test_an_lcm_checkpoint_gets_the_lcm_schedule_and_its_guidance_embedding(tmp_path) -> None:
    """A latent-consistency checkpoint (LCMScheduler, a UNet that takes the guidance scale as an
    embedding) is recognised on loading: the guidance embedding reaches the UNet, and a job that
    names no preset samples with LCM's 4-step schedule, guidance-free."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    tiny = load_prior("tiny", torch.device("cpu"))
    torch.manual_seed(0)
    config = {k: v for k, v in tiny.unet.config.items() if k != "_use_default_values"}
    unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 32})
    save_pipeline(tiny, tmp_path / "lcm-model", LCMScheduler(**SD_SCHEDULER), unet)
    prior = load_prior(str(tmp_path / "lcm-model"), torch.device("cpu"))
    assert prior.few_step == "lcm"
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = prior.encode_prompt("a vase", "")
    first = prior.predict_eps(x, 500, embeds, None, "cond")[1]
    prior.embedded_guidance = 2.0
    assert (prior.predict_eps(x, 500, embeds, None, "cond")[1] - first).abs().max() > 1e-4

    request = JobRequest.from_fields({"prompt": "a vase", "model": str(tmp_path / "lcm-model"), "texture_size": 512,
                                      "steps": 1})
    cfg = request.config(few_step=prior.few_step)
    assert (cfg.sampler, cfg.ddim_steps, cfg.guidance) == ("lcm", 4, 1.0)
    rec = Logged()
    run_texture_job(request, grid_mesh(), rec, ModelCache())
    assert rec.textures[-1][1] and any("'lcm' schedule" in line for line in rec.lines)


def test_a_lora_is_fused_into_the_model_through_diffusers_loader(tmp_path) -> None:
    """A LoRA file (made here with peft, saved the way diffusers' training scripts save one) loads
    onto the model: the fused UNet predicts what the UNet with the adapter attached predicted, and
    a LoRA named like an LCM-LoRA selects the LCM schedule."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    tiny = load_prior("tiny", torch.device("cpu"))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = tiny.encode_prompt("a vase", "")
    base = tiny.predict_eps(x, 400, embeds, None)[1]
    tiny.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, param in tiny.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    adapted = tiny.predict_eps(x, 400, embeds, None)[1]
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(tiny.unet)),
        weight_name="lcm-lora-tiny.safetensors")

    fused = load_prior("tiny", torch.device("cpu"), lora=str(tmp_path / "lcm-lora-tiny.safetensors"))
    out = fused.predict_eps(x, 400, embeds, None)[1]
    assert (adapted - base).abs().max() > 1e-3
    assert torch.allclose(out, adapted, atol=1e-4)
    assert fused.few_step == "lcm" and not any("lora" in n for n, _ in fused.unet.named_parameters())
    with pytest.raises(ModelError, match="unknown LoRA"):
        load_prior("tiny", torch.device("cpu"), lora="no such lora")


#: The attention layers LoRAs adapt, in the UNet and the text encoder.
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def test_a_lora_in_kohyas_layout_is_fused_and_one_for_another_model_is_refused(tmp_path, monkeypatch) -> None:
    """Most LoRAs artists download are in Kohya's layout (lora_unet_..., lora_te_..., alphas):
    it loads. diffusers fused the layers of a LoRA for another model that matched and only logged
    the rest; such a LoRA is refused, and one whose layers are sized for another model too."""
    import shutil

    import huggingface_hub.constants
    from safetensors.torch import save_file

    tiny = load_prior("tiny", torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for prefix, model in (("lora_unet_", tiny.unet), ("lora_te_", tiny.text_encoder)):
        for name, layer in model.named_modules():
            if name.endswith(LORA_LAYERS):
                key = prefix + name.replace(".", "_")
                weights[f"{key}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=generator) * 0.1
                weights[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=generator) * 0.1
                weights[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(weights, tmp_path / "kohya.safetensors")
    fused = load_prior("tiny", torch.device("cpu"), lora=str(tmp_path / "kohya.safetensors"))
    half = load_prior("tiny", torch.device("cpu"), lora=str(tmp_path / "kohya.safetensors"), lora_weight=0.5)
    layer = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_q", "weight")

    def weight(prior):
        found = prior.unet
        for step in layer:
            found = found[step] if isinstance(step, int) else getattr(found, step)
        return found.detach()
    assert torch.allclose(weight(half) - weight(tiny), (weight(fused) - weight(tiny)) / 2, atol=1e-6)
    assert (weight(fused) - weight(tiny)).abs().max() > 1e-3
    # The address of the file's page on the hub, as copied from the browser, fetches it (here from the cache).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--kiln-tests--loras" / "snapshots" / ("0" * 40)
    (snapshot / "styles").mkdir(parents=True)
    shutil.copy(tmp_path / "kohya.safetensors", snapshot / "styles" / "my style.safetensors")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    fetched = load_prior("tiny", torch.device("cpu"), lora="https://huggingface.co/kiln-tests/loras/blob/main/styles/"
                                                           "my%20style.safetensors")
    assert all(torch.equal(p, q) for p, q in zip(fetched.unet.parameters(), fused.unet.parameters()))
    original = load_prior("tiny", torch.device("cpu"))
    for model, own in ((fused.unet, original.unet), (fused.text_encoder, original.text_encoder)):
        changed = [n for (n, p), q in zip(model.named_parameters(), own.parameters()) if not torch.equal(p, q)]
        assert changed and all(n.removesuffix(".weight").endswith(LORA_LAYERS) for n in changed)

    foreign = dict(weights, **{"lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
                               torch.ones(4, 32), "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_"
                               "to_q.lora_up.weight": torch.ones(32, 4)})
    save_file(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(ModelError, match="does not fit tiny: 1 of the layers it adapts is missing from tiny"):
        load_prior("tiny", torch.device("cpu"), lora=str(tmp_path / "foreign.safetensors"))
    wide = {key: torch.zeros(4, 64) if key.endswith("attn2_to_k.lora_down.weight") else value
            for key, value in weights.items()}
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ModelError, match=r"does not fit tiny: \d+ of the layers it adapts are missing from tiny or "
                                         "sized otherwise, so it was trained on another model"):
        load_prior("tiny", torch.device("cpu"), lora=str(tmp_path / "wide.safetensors"))


def tiny_taesd(latent_channels: int = 4):
    """A TAESD-architecture autoencoder (diffusers' AutoencoderTiny) at the tiny model's latent
    size, 1/4, random weights: two stride-2 stages each way."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(16, 16, 16), decoder_block_out_channels=(16, 16, 16),
                           num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1),
                           latent_channels=latent_channels).eval()


def test_a_tiny_autoencoder_replaces_the_models_vae(tmp_path) -> None:
    """A TAESD folder takes the VAE's place: encoding and decoding follow TAESD's own convention
    (images in [0, 1], latents already scaled), gradients reach the render (SDS needs them), the
    cache keeps the two variants apart, and a texturing job runs with it. A single file must be
    TAESD's published architecture; a VAE of another latent shape or scale (SDXL's, which shares
    SD's architecture), or an unknown name, is refused with what to pick instead."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    taesd = tiny_taesd()
    taesd.save_pretrained(tmp_path / "taesd")
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        raw_latents = taesd.encoder.layers(images)
        raw_images = taesd.decoder.layers(torch.tanh(raw_latents / 3) * 3).clamp(0, 1)
    prior = load_prior("tiny", torch.device("cpu"), vae=str(tmp_path / "taesd"))
    assert type(prior.vae).__name__ == "AutoencoderTiny" and prior.resolution == 64
    latents = prior.encode(images)
    assert latents.shape == (2, 4, 16, 16) and torch.allclose(latents, raw_latents, atol=1e-5)
    assert torch.allclose(prior.decode(latents), raw_images, atol=1e-5)
    render = images.clone().requires_grad_()
    prior.encode(render).square().sum().backward()
    assert render.grad.abs().sum() > 0

    models = ModelCache()
    plain = models.get(JobRequest.from_fields({"prompt": "a vase"}), Recorder())
    request = JobRequest.from_fields({"prompt": "a vase", "vae": str(tmp_path / "taesd"), "texture_size": 512,
                                      "steps": 1})
    fast = models.get(request, Recorder())
    assert fast is not plain and type(plain.vae).__name__ == "AutoencoderKL"
    rec = Recorder()
    run_texture_job(request, grid_mesh(), rec, models)
    assert rec.textures[-1][1] and rec.textures[-1][0].std() > 0

    save_file(AutoencoderTiny().state_dict(), tmp_path / "taesd-published.safetensors")  # SD's 1/8 latents
    with pytest.raises(ModelError, match="4 latent channels at 1/8 size.*at 1/4: pick the VAE made for this"):
        load_prior("tiny", torch.device("cpu"), vae=str(tmp_path / "taesd-published.safetensors"))
    save_file(taesd.state_dict(), tmp_path / "taesd-other.safetensors")
    with pytest.raises(ModelError, match="not TAESD's published architecture.*folder it came in"):
        load_prior("tiny", torch.device("cpu"), vae=str(tmp_path / "taesd-other.safetensors"))
    tiny_taesd(latent_channels=16).save_pretrained(tmp_path / "taesd-sd3")
    with pytest.raises(ModelError, match="16 latent channels"):
        load_prior("tiny", torch.device("cpu"), vae=str(tmp_path / "taesd-sd3"))
    with pytest.raises(ModelError, match="unknown VAE"):
        load_prior("tiny", torch.device("cpu"), vae="no such vae")
    own = load_prior("tiny", torch.device("cpu")).vae
    own.save_pretrained(tmp_path / "vae-ft")  # a fine-tuned VAE of the model's own latent space swaps in
    assert type(load_prior("tiny", torch.device("cpu"), vae=str(tmp_path / "vae-ft")).vae).__name__ == "AutoencoderKL"
    own.register_to_config(scaling_factor=0.13025)
    own.save_pretrained(tmp_path / "sdxl-vae")
    with pytest.raises(ModelError, match=r"scales its latents by 0.13025, and tiny's by 0.18215: it was made for "
                                         r"another model \(SDXL\)"):
        load_prior("tiny", torch.device("cpu"), vae=str(tmp_path / "sdxl-vae"))


def test_view_dependent_prompts_follow_dreamfusions_rule_and_reach_the_unet() -> None:
    from backend.cameras import orbit, view_suffix
    from backend.prior import Prompts, Views

    assert [view_suffix(a, e) for a, e in [(10, 0), (-30, 20), (90, 0), (200, 10), (300, 0), (0, 70)]] == \
        ["front view", "front view", "side view", "back view", "side view", "overhead view"]
    prior = load_prior("tiny", torch.device("cpu"))
    mesh = grid_mesh()
    views = Views(orbit(mesh.positions, [0.0, 180.0], [0.0, 0.0], "y"))
    stacked = Prompts(prior, "a vase", "").for_views(views.cameras)
    assert stacked.shape[:2] == (2, 2)
    assert torch.equal(stacked[1, 0], prior.encode_prompt("a vase, front view", "")[1])
    assert torch.equal(stacked[1, 1], prior.encode_prompt("a vase, back view", "")[1])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    together = prior.predict_eps(x, 300, stacked, views)[1]
    front = prior.predict_eps(x[:1], 300, prior.encode_prompt("a vase, front view", ""), views)[1]
    assert torch.allclose(together[:1], front, atol=1e-5)


def test_a_long_prompt_keeps_its_view_suffix_and_the_job_says_what_it_ignores() -> None:
    """CLIP reads 77 tokens. Appending ", back view" to a longer prompt used to be cut off with the
    rest, so every view got the same text; now the prompt is cut before the suffix, and the job
    names the words the model never reads."""
    from backend.prior import Prompts, view_prompt

    prior = load_prior("tiny", torch.device("cpu"))
    long = " ".join(["a weathered bronze statue with green patina"] * 12)
    assert torch.equal(prior.encode_prompt(long + ", front view", ""), prior.encode_prompt(long + ", back view", ""))
    prompts = Prompts(prior, long, "")
    assert not torch.equal(prompts.per_view["front view"], prompts.per_view["back view"])
    text = view_prompt(long, "back view", prior.tokenizer)
    assert text.endswith(", back view") and len(prior.tokenizer(text).input_ids) == prior.tokenizer.model_max_length
    assert view_prompt("a vase", "back view", prior.tokenizer) == "a vase, back view"  # short prompts as they were
    events = Logged()
    ModelCache().get(JobRequest.from_fields({"prompt": long, "negative_prompt": "blurry"}), events)
    notes = [line for line in events.lines if "ignores its end" in line]
    assert len(notes) == 1 and notes[0].startswith("the prompt is longer than tiny's text encoder reads (75 tokens)")
    assert "green patina'" in notes[0]  # it quotes the end the model drops


def test_low_vram_mode_predicts_the_same_in_smaller_batches() -> None:
    """Low-VRAM mode sends the views and the CFG pair through the UNet two images at a time and
    the VAE one at a time: the same numbers, less memory at once. The cached model switches
    modes in place, with no reload."""
    from backend.cameras import orbit
    from backend.prior import LOW_VRAM_BATCH, Prompts, Views

    models = ModelCache()
    normal = JobRequest.from_fields({"prompt": "a vase"})
    prior = models.get(normal, Recorder())
    mesh = grid_mesh()
    views = Views(orbit(mesh.positions, [0.0, 120.0, 240.0], [10.0, 10.0, 40.0], "y"))
    prompt = Prompts(prior, "a vase", "blurry").for_views(views.cameras)
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    full, latents = prior.predict_eps(x, 400, prompt, views), prior.encode(images)
    decoded = prior.decode(latents)
    batches: list[int] = []
    hook = prior.unet.register_forward_pre_hook(lambda _m, args: batches.append(len(args[0])))
    assert models.get(JobRequest.from_fields({"prompt": "a vase", "low_vram": True}), Recorder()) is prior
    low = prior.predict_eps(x, 400, prompt, views)
    hook.remove()
    assert batches == [LOW_VRAM_BATCH] * 3 and prior.vae.use_slicing
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(low, full))
    assert torch.allclose(prior.encode(images), latents, atol=1e-5)
    assert torch.allclose(prior.decode(latents), decoded, atol=1e-5)
    models.get(normal, Recorder())
    assert prior.batch_limit is None and not prior.vae.use_slicing
