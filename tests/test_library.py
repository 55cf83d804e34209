"""The asset library (indexing, incremental updates, search) and ReDream's use of a reference:
facing, and the warm-up pulling a texture toward the asset's views."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_exact_prior import box_mesh, pattern

from backend import library, mesh_file, protocol
from backend.assets import Asset, load_asset
from backend.cameras import orbit
from backend.cli import write_result
from backend.embed import ClipEmbedder, WordLlamaEmbedder
from backend.events import TextureEvents
from backend.exact_prior import ExactPrior, Reference
from backend.library import ANN_FILE, INDEX_FILE, LibraryIndex, ann_index, build_index, caption_for, search
from backend.mesh import Mesh, MeshError
from backend.presets import PRESETS, WarmUp
from backend.prior import ModelError, Views
from backend.raster import rasterize_views
from backend.reference import ReferenceViews, choose_yaw, clip_facing, prior_facing
from backend.sir import SIRTexturer
from backend.texture import render, sample_image


@pytest.fixture(scope="module")
def embedder() -> WordLlamaEmbedder:
    return WordLlamaEmbedder()


def rgba(texture: torch.Tensor) -> np.ndarray:
    rgb = (texture.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], 2)


def save(mesh: Mesh, texture: torch.Tensor, folder: Path, name: str) -> Path:
    written = write_result(replace(mesh, name=name), rgba(texture), folder)
    Path(written["texture"]).unlink()
    return Path(written["mesh"])


def small_library(folder: Path) -> Path:
    import trimesh

    box = box_mesh()
    save(box, pattern(32, 0.0), folder, "wooden_crate")
    trimesh.creation.cylinder(0.3, 1.0).export(folder / "metal_barrel.ply")
    trimesh.creation.icosphere(1, 0.5).export(folder / "glass_ball.obj")
    (folder / "sub").mkdir()
    trimesh.creation.box(extents=(1, 0.1, 1)).export(folder / "sub" / "Table_Top-03.ply")
    return folder


def test_captions_come_from_a_sidecar_or_the_file_name(tmp_path: Path) -> None:
    assert caption_for(tmp_path / "old_barrel-02.glb") == "old barrel"
    assert caption_for(tmp_path / "RustyLantern.obj") == "rusty lantern"
    assert caption_for(tmp_path / "my vase (1).obj") == "my vase"
    assert caption_for(tmp_path / "Ваза синяя.glb") == "ваза синяя"
    (tmp_path / "x1.ply.txt").write_text("a moss-covered stone well\n")
    assert caption_for(tmp_path / "x1.ply") == "a moss-covered stone well"


def test_index_is_incremental_and_skips_bad_files_with_a_reason(tmp_path: Path, embedder) -> None:
    lib = small_library(tmp_path)
    (lib / "broken.glb").write_bytes(b"definitely not glTF")
    index, report = build_index(lib, embedder)
    assert sorted(report.added) == ["glass_ball.obj", "metal_barrel.ply", "sub/Table_Top-03.ply", "wooden_crate.glb"]
    assert list(report.skipped) == ["broken.glb"] and "broken.glb" in report.skipped["broken.glb"]
    assert index.text.shape == (4, embedder.dim) and index.thumbnails.shape == (4, 4, 64, 64, 3)
    assert np.allclose(np.linalg.norm(index.text, axis=1), 1, atol=1e-5)
    # The thumbnails show the asset: the textured crate is not a blank image.
    crate = index.thumbnails[[e.path for e in index.entries].index("wooden_crate.glb")]
    assert crate.std() > 20

    # Nothing changed: nothing re-read, the broken file not retried.
    again, report = build_index(lib, embedder)
    assert report.reused == 4 and not report.added and not report.updated and list(report.skipped) == ["broken.glb"]
    assert np.array_equal(again.text, index.text)

    # One file changes, one disappears, the broken one is fixed.
    import trimesh
    trimesh.creation.cylinder(0.5, 0.4).export(lib / "metal_barrel.ply")
    os.utime(lib / "metal_barrel.ply", ns=(1, 1))
    (lib / "glass_ball.obj").unlink()
    trimesh.creation.box().export(lib / "broken.glb")
    third, report = build_index(lib, embedder)
    assert report.updated == ["metal_barrel.ply"] and report.removed == ["glass_ball.obj"]
    assert report.added == ["broken.glb"] and not report.skipped and report.reused == 2
    stored = LibraryIndex.load(lib)
    assert [e.path for e in stored.entries] == [e.path for e in third.entries]
    assert (lib / INDEX_FILE).is_file() and not (lib / (INDEX_FILE + ".tmp")).exists()


def test_an_asset_whose_texture_file_is_missing_is_indexed_saying_which(tmp_path: Path, embedder) -> None:
    """trimesh drops a texture it cannot find without a word; the index names the file and where it
    was looked for, so a library copied without its textures does not quietly turn grey. A .gltf's
    missing geometry file is named too (trimesh says only its name)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    corners = "v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nvt 0 0\nvt 1 0\nvt 0 1\nusemtl oak\n" \
              "f 1/1 2/2 3/3\nf 1/1 2/2 4/3\nf 1/1 3/2 4/3\nf 2/1 3/2 4/3\n"
    (lib / "crate.obj").write_text("mtllib crate.mtl\n" + corners)
    (lib / "crate.mtl").write_text("newmtl oak\nKd 1 1 1\nmap_Kd -s 1 1 1 oak planks.png\n")
    (lib / "stool.obj").write_text("mtllib gone.mtl\n" + corners)
    save(box_mesh(), pattern(16, 0.0), lib, "barrel")
    glb = (lib / "barrel.glb").read_bytes()
    length = int.from_bytes(glb[12:16], "little")
    header = json.loads(glb[20:20 + length])
    header["images"] = [{"uri": "rusty%20metal.png"}]  # files a .gltf names beside it, left behind
    header["buffers"][0]["uri"] = "barrel%20data.bin"
    (lib / "barrel.gltf").write_text(json.dumps(header))
    (lib / "barrel.glb").unlink()
    header["extensionsRequired"] = ["KHR_draco_mesh_compression"]  # trimesh would read a heap at the origin
    (tmp_path / "packed.gltf").write_text(json.dumps(header))
    with pytest.raises(MeshError, match="compressed with Draco .* export it uncompressed"):
        load_asset(tmp_path / "packed.gltf")

    assert mesh_file.missing_texture(lib / "crate.obj") == \
        f"'oak' in crate.mtl shows the texture 'planks.png', which is not in {lib}"
    assert mesh_file.missing_texture(lib / "stool.obj") == f"its material library 'gone.mtl' is not in {lib}"
    assert mesh_file.missing_texture(lib / "barrel.gltf") == \
        f"its material shows the texture 'rusty metal.png', which is not in {lib}"
    _, report = build_index(lib, embedder)
    assert sorted(report.added) == ["crate.obj", "stool.obj"]
    assert report.skipped["barrel.gltf"].endswith(f"the file 'barrel data.bin' holding its geometry is not in {lib}: "
                                                  "copy it there"), report.skipped
    assert report.problems()[1:] == [
        f"crate.obj indexed in flat colours: 'oak' in crate.mtl shows the texture 'planks.png', which is not in {lib}: "
        "put the file there and index again",
        f"stool.obj indexed in flat colours: its material library 'gone.mtl' is not in {lib}: put the file there and "
        "index again"]
    assert load_asset(lib / "stool.obj").texture is None  # not the grey trimesh makes up for it
    (lib / "oak planks.png").touch()
    assert mesh_file.missing_texture(lib / "crate.obj") is None  # found: a name with a space, after options


def test_assets_show_their_colours_as_gltf_and_blender_read_them(tmp_path: Path) -> None:
    """Base Color factors multiply linear light, and a file's materials keep their own colours when
    trimesh joins them into one texture (it would multiply the sRGB bytes by the factor's bytes and
    wrap them: red turned cyan)."""
    import trimesh
    from PIL import Image

    def part(colour, factor, at):
        box = trimesh.creation.box()
        texture = None if colour is None else Image.new("RGB", (8, 8), colour)
        box.visual = trimesh.visual.TextureVisuals(
            uv=np.full((len(box.vertices), 2), 0.5), material=trimesh.visual.material.PBRMaterial(
                baseColorTexture=texture, baseColorFactor=factor))
        return box.apply_translation((at, 0, 0))

    scene = trimesh.Scene([part((200, 30, 0), [1.0, 1.0, 1.0, 1.0], 0), part((0, 60, 255), [0.5, 1.0, 1.0, 1.0], 3),
                           part(None, [0.2, 0.2, 0.2, 1.0], 6)])
    scene.export(tmp_path / "three.glb")
    asset = load_asset(tmp_path / "three.glb")
    x = asset.mesh.positions[asset.mesh.triangles].mean(axis=1)[:, 0]
    shown = sample_image(asset.texture, torch.as_tensor(asset.mesh.corner_uvs).mean(dim=1)) * 255
    for at, expected in ((0, (200, 30, 0)), (3, (0, 60, 255)), (6, (124, 124, 124))):  # linear 0.2 is 124 in sRGB
        assert np.allclose(shown[np.abs(x - at - x.min() - 0.5) < 1].numpy(), expected, atol=1.5), (at, expected)
    # Parts sharing one texture (a game asset's atlas) keep it as it is, and their UVs, repeats too;
    # beside another texture, they share one cell of it.
    shared = [part((40, 90, 160), [1.0, 1.0, 1.0, 1.0], at) for at in (0, 3, 6, 9)]
    shared[0].visual.material.baseColorTexture = Image.new("RGB", (256, 128), (40, 90, 160))
    shared[1].visual.uv = shared[1].visual.uv * 3  # tiled three times
    for other in shared[1:]:
        other.visual.material = shared[0].visual.material
    trimesh.Scene(shared).export(tmp_path / "shared.glb")
    one = load_asset(tmp_path / "shared.glb")
    assert one.texture.shape == (3, 128, 256) and one.mesh.corner_uvs.max() == pytest.approx(1.5)
    trimesh.Scene([*shared, part((0, 0, 0), [1.0, 1.0, 1.0, 1.0], 12)]).export(tmp_path / "shared_and_black.glb")
    assert load_asset(tmp_path / "shared_and_black.glb").texture.shape == (3, 256 + 4, 2 * (256 + 4))
    trimesh.Scene([part((255, 255, 255), [0.2, 0.2, 0.2, 1.0], 0)]).export(tmp_path / "tinted.glb")
    tinted = load_asset(tmp_path / "tinted.glb")
    assert np.allclose(tinted.texture.mean(dim=(1, 2)) * 255, 124, atol=1)
    trimesh.Scene([part(None, [0.2, 0.2, 0.2, 1.0], 0)]).export(tmp_path / "flat.glb")
    assert np.allclose(load_asset(tmp_path / "flat.glb").corner_colours * 255, 124, atol=1)
    # Two materials of flat colours (linear Kd, as Blender writes and reads it): each part its own.
    (tmp_path / "two.mtl").write_text("newmtl dark\nKd 0.2 0.2 0.2\nnewmtl red\nKd 1 0 0\n")
    (tmp_path / "two.obj").write_text("mtllib two.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nv 5 0 0\nv 6 0 0\n"
                                      "v 5 1 0\nv 5 0 1\nusemtl dark\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n"
                                      "usemtl red\nf 5 6 7\nf 5 6 8\nf 5 7 8\nf 6 7 8\n")
    two = load_asset(tmp_path / "two.obj")
    left = two.mesh.positions[two.mesh.triangles].mean(axis=1)[:, 0] < 3
    assert np.allclose(two.corner_colours[left] * 255, 124, atol=1)
    assert np.allclose(two.corner_colours[~left] * 255, (255, 0, 0), atol=1)


def test_a_files_nodes_are_placed_mirrored_ones_too_and_share_their_texture(tmp_path: Path) -> None:
    """Nodes of one mesh and texture (instances), one of them mirrored: each where its node puts it,
    faces outward (a mirror flips the winding back), and the texture read once, not once per node."""
    import trimesh
    from PIL import Image

    from backend.mesh_file import load_mesh_file, placed_parts

    box = trimesh.creation.box()
    box.visual = trimesh.visual.TextureVisuals(uv=np.asarray(box.vertices)[:, :2] + 0.5,
                                               image=Image.new("RGB", (64, 64), (10, 200, 30)))
    scene = trimesh.Scene()
    scene.add_geometry(box, node_name="crate0", geom_name="crate")
    for k, scale in ((1, 1), (2, -1)):  # two more nodes of the same mesh, the last mirrored
        place = trimesh.transformations.translation_matrix((3.0 * k, 0, 0)) @ np.diag([scale, 1, 1, 1])
        scene.graph.update(frame_to=f"crate{k}", frame_from=scene.graph.base_frame, matrix=place, geometry="crate")
    scene.export(tmp_path / "crates.glb")
    loaded = trimesh.load(tmp_path / "crates.glb", force="scene", process=False)
    parts = placed_parts(loaded)
    assert len({id(p.visual) for p in parts}) == 1  # shared, not copied per node
    mesh, joined = load_mesh_file(tmp_path / "crates.glb")
    assert mesh.triangle_count == 36 and joined.visual.material.baseColorTexture.size == (64, 64)
    corners = mesh.positions[mesh.triangles].astype(np.float64)
    outward = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    centres = np.round(corners.mean(axis=1)[:, 0] / 3) * 3  # each face's crate, by its x
    away = corners.mean(axis=1) - np.stack([centres, np.zeros_like(centres), np.zeros_like(centres)], axis=1)
    assert ((outward * away).sum(axis=1) > 0).all()


def test_a_library_folder_that_cannot_be_written_is_a_clear_error(tmp_path: Path, embedder) -> None:
    """safetensors raises its own error type for I/O errors, not OSError (a read-only share; here,
    a folder where the index's part file goes, as tests run as root)."""
    lib = small_library(tmp_path)
    (lib / (INDEX_FILE + ".tmp")).mkdir()
    with pytest.raises(MeshError, match="cannot write the library index in .* make the folder writable"):
        build_index(lib, embedder)


def test_search_finds_the_asset_whose_caption_is_nearest(tmp_path: Path, embedder) -> None:
    index, _ = build_index(small_library(tmp_path), embedder)
    for prompt, expected in (("a wooden crate", "wooden_crate.glb"), ("a metal barrel", "metal_barrel.ply"),
                             ("a table top", "sub/Table_Top-03.ply")):
        hits = search([index], prompt, 2, embedder)
        assert hits[0].entry.path == expected, (prompt, [h.entry.path for h in hits])
        assert hits[0].score > hits[1].score and hits[0].file.is_file()


def test_large_libraries_search_through_a_saved_hnsw_graph(tmp_path: Path, embedder, monkeypatch) -> None:
    lib = small_library(tmp_path)
    exact = [h.entry.path for h in search([build_index(lib, embedder)[0]], "a metal barrel", 4, embedder)]
    assert not (lib / ANN_FILE).exists()
    monkeypatch.setattr(library, "EXACT_LIMIT", 2)
    (lib / "metal_barrel.ply").touch()  # any change re-writes the index, and with it the graph
    build_index(lib, embedder)
    assert (lib / ANN_FILE).is_file()
    stored = LibraryIndex.load(lib)
    assert [h.entry.path for h in search([stored], "a metal barrel", 4, embedder)] == exact
    assert stored._ann is not None  # the search went through the graph
    monkeypatch.setattr(library, "EXACT_LIMIT", 20_000)
    (lib / "metal_barrel.ply").touch()
    build_index(lib, embedder)
    assert not (lib / ANN_FILE).exists()


def test_the_approximate_index_agrees_with_exact_search() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    found = ann_index(vectors).search(vectors[17], 5)
    assert int(found.keys[0]) == 17 and float(found.distances[0]) < 1e-4


def test_a_missing_library_folder_is_a_clear_error(tmp_path: Path, embedder) -> None:
    with pytest.raises(MeshError, match="is not a folder"):
        build_index(tmp_path / "nope", embedder)


def exact_case() -> tuple[Mesh, ExactPrior, torch.Tensor]:
    mesh = box_mesh()
    target = pattern(32, 0.0)
    return mesh, ExactPrior([Reference("crate", mesh, target), Reference("other", mesh, pattern(32, 2.5))],
                            resolution=32), target


def test_facing_turns_a_turned_asset_back(tmp_path: Path) -> None:
    mesh, prior, target = exact_case()
    a = np.radians(90.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]], np.float32)
    asset = load_asset(save(replace(mesh, positions=mesh.positions @ rot.T), target, tmp_path, "crate"))
    yaw = choose_yaw(asset, mesh.positions, "y", prior_facing(prior, "crate", ""), 32, 1.0, torch.device("cpu"))
    assert yaw == 270.0


def test_warm_up_pulls_the_texture_toward_the_reference() -> None:
    """With a prior that knows only another texture, the warm-up (all updates, heavy weight) still
    brings the result closer to the reference asset's look than the same run without it."""
    mesh, _, target = exact_case()
    prior = ExactPrior([Reference("crate", mesh, pattern(32, 2.5))], resolution=32)
    reference = Asset(mesh, texture=target)
    cfg = replace(PRESETS["sir"]["pipeline-check"], iterations=2, recon_steps=8, init_recon_steps=8,
                  warmup=WarmUp(weight=20.0, fraction=1.0))
    cams = orbit(mesh.positions, [30.0, 150.0, 270.0], [20.0, -10.0, 40.0], "y")
    truth, covered = reference.render(cams, 32, 1.0)

    def error(with_reference: bool) -> float:
        views = ReferenceViews(reference, cfg.warmup, 32, 1.0) if with_reference else None
        texturer = SIRTexturer(mesh, prior, cfg, 64, "crate", "", seed=0, events=TextureEvents(), reference=views)
        texturer.run()
        raster = rasterize_views(torch.as_tensor(mesh.positions), torch.as_tensor(mesh.triangles), cams.mvp, 32)
        with torch.no_grad():
            images = render(texturer.texture.sample, torch.as_tensor(mesh.corner_uvs), raster, 1.0)
        return float(((images - truth) * covered).square().mean())

    assert error(True) < 0.5 * error(False)


def tiny_clip(folder: Path) -> Path:
    """A CLIPModel at toy size with random weights and a generated byte-level vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    from backend.tiny_model import _tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 37,
                                     "num_attention_heads": 4, "num_hidden_layers": 2, "bos_token_id": 512,
                                     "eos_token_id": 513, "pad_token_id": 513},
                        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                                       "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
                        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    _tokenizer(folder).save_pretrained(folder)
    return folder


def test_clip_reranks_and_faces_when_given(tmp_path: Path, embedder) -> None:
    clip = ClipEmbedder.load(str(tiny_clip(tmp_path / "clip")), offline=True, device=torch.device("cpu"))
    assert clip.text(["a crate", "a barrel"]).shape == (2, 16)
    lib = small_library(tmp_path / "lib")
    index, _ = build_index(lib, embedder, clip)
    assert index.images.shape == (4, 16) and index.clip == clip.name
    # Re-ranking orders the text hits by picture; its scores are CLIP's, not the captions'.
    hits = search([index], "a wooden crate", 3, embedder, clip)
    expected = sorted((float(index.images[[e.path for e in index.entries].index(h.entry.path)]
                             @ clip.text(["a wooden crate"])[0]) for h in hits), reverse=True)
    assert [round(h.score, 5) for h in hits] == [round(s, 5) for s in expected]
    # An index made without CLIP is rebuilt when CLIP is given, and vice versa.
    _, report = build_index(lib, embedder)
    assert len(report.added) == 4
    mesh, _, target = exact_case()
    yaw = choose_yaw(Asset(mesh, texture=target), mesh.positions, "y", clip_facing(clip, "a crate"), 32, 1.0,
                     torch.device("cpu"))
    assert yaw in (0.0, 90.0, 180.0, 270.0)


def test_clip_that_does_not_exist_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown CLIP model"):
        ClipEmbedder.load(str(tmp_path / "missing"), offline=True, device=torch.device("cpu"))
    with pytest.raises(ModelError, match="the weights of CLIP 'openai/clip-vit-base-patch32' are not on this machine"):
        ClipEmbedder.load("https://huggingface.co/openai/clip-vit-base-patch32", offline=True,
                          device=torch.device("cpu"))  # its page's address, read as its id


def test_cli_indexes_and_textures_with_a_retrieved_reference(tmp_path: Path) -> None:
    lib = small_library(tmp_path / "lib")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    (tmp_path / "typo").mkdir()  # a wrong path indexes as empty: the TD's script must hear of it
    (tmp_path / "typo" / "props.blend").write_bytes(b"BLENDER-v402")  # Blender's own asset library: not read here
    done = subprocess.run([sys.executable, "-m", "backend", "index", str(lib), str(tmp_path / "typo")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr
    assert "4 assets (4 new" in done.stdout and "typo: 0 assets" in done.stdout, done.stdout
    assert "holds no .glb, .gltf, .obj, .ply files" in done.stdout
    assert "left out 1 .blend file (props.blend): Kiln reads .blend assets through Blender" in done.stderr
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "backend", "texture", str(ROOT / "examples" / "vase.obj"),
                           "--prompt", "a wooden crate", "--preset", "pipeline-check", "--size", "512",
                           "--library", str(lib), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["reference"]["file"].endswith("wooden_crate.glb") and result["reference"]["yaw"] in (0, 90, 180, 270)


def test_server_indexes_a_library_and_reports_the_reference_a_job_uses(server, tmp_path: Path) -> None:
    from conftest import read_until, submit

    lib = small_library(tmp_path)
    (lib / "broken.glb").write_bytes(b"nope")
    lantern = lib / "lost_lantern.obj"  # copied without its .mtl: indexed, and used, in flat colours
    lantern.write_text("mtllib lost_lantern.mtl\n" + (lib / "glass_ball.obj").read_text())
    sock = server.connect()
    protocol.send(sock, protocol.SUBMIT, {"task": protocol.TASK_INDEX, "libraries": [str(lib)]})
    msgs = read_until(sock, protocol.DONE, protocol.ERROR)
    assert msgs[-1].type == protocol.DONE and msgs[-1].get("status") == "finished", msgs[-1]
    logs = [m.get("text") for m in msgs if m.type == protocol.LOG]
    assert any("5 assets (5 new" in text and "1 unreadable" in text for text in logs), logs
    assert any(text.startswith("skipped broken.glb") for text in logs)
    assert f"lost_lantern.obj indexed in flat colours: its material library 'lost_lantern.mtl' is not in {lib}: " \
           "put the file there and index again" in logs, logs

    submit(sock, prompt="a metal barrel", libraries=[str(lib)])
    msgs = read_until(sock, protocol.DONE, protocol.ERROR)
    assert msgs[-1].type == protocol.DONE and msgs[-1].get("status") == "finished", msgs[-1]
    reference = next(m for m in msgs if m.type == protocol.REFERENCE)
    assert reference.get("file").endswith("metal_barrel.ply") and reference.arrays["thumbnails"].shape == (4, 64, 64, 3)
    assert any(m.get("text", "").startswith("the reference metal_barrel.ply has no colours of its own")
               for m in msgs if m.type == protocol.LOG)  # a bare PLY: seen grey
    submit(sock, prompt="a lantern", references=[str(lantern)])
    msgs = read_until(sock, protocol.DONE, protocol.ERROR)
    assert msgs[-1].type == protocol.DONE and msgs[-1].get("status") == "finished", msgs[-1]
    assert f"the reference lost_lantern.obj shows flat colours: its material library 'lost_lantern.mtl' is not in " \
           f"{lib}" in [m.get("text") for m in msgs if m.type == protocol.LOG]

    protocol.send(sock, protocol.SUBMIT, {"task": protocol.TASK_INDEX, "libraries": []})
    error = read_until(sock, protocol.DONE, protocol.ERROR)[-1]
    assert error.type == protocol.ERROR and "no asset library" in error.get("message")
    (tmp_path / "unindexed").mkdir()
    submit(sock, libraries=[str(tmp_path / "unindexed")])
    error = read_until(sock, protocol.DONE, protocol.ERROR)[-1]
    assert error.type == protocol.ERROR and "has not been indexed" in error.get("message")


def prefixed(arrays: dict, prefix: str) -> dict:
    return {prefix + name: blob for name, blob in arrays.items()}


def test_server_searches_and_takes_the_artists_own_reference_object(server, tmp_path: Path) -> None:
    from conftest import cube_arrays, read_until, submit

    lib = small_library(tmp_path)
    sock = server.connect()
    protocol.send(sock, protocol.SUBMIT, {"task": protocol.TASK_INDEX, "libraries": [str(lib)]})
    assert read_until(sock, protocol.DONE, protocol.ERROR)[-1].type == protocol.DONE
    protocol.send(sock, protocol.SUBMIT, {"task": protocol.TASK_SEARCH, "prompt": "a wooden crate",
                                          "libraries": [str(lib)]})
    msgs = read_until(sock, protocol.DONE, protocol.ERROR)
    hits = next(m for m in msgs if m.type == protocol.HITS)
    assert hits.get("hits")[0]["file"].endswith("wooden_crate.glb") and hits.get("hits")[0]["caption"] == "wooden crate"
    scores = [h["score"] for h in hits.get("hits")]
    assert scores == sorted(scores, reverse=True) and hits.arrays["thumbnails"].shape == (4, 4, 64, 64, 3)

    red = np.zeros((8, 8, 4), np.uint8)
    red[..., 0], red[..., 3] = 220, 255
    own = prefixed(cube_arrays(), protocol.REFERENCE_PREFIX)
    own["reference_texture"] = protocol.array("|u1", red.shape, red)
    arrays = {**cube_arrays(), **own}
    submit(sock, arrays, reference_object="My Crate", reference_loop_count=36)
    msgs = read_until(sock, protocol.DONE, protocol.ERROR)
    assert msgs[-1].type == protocol.DONE and msgs[-1].get("status") == "finished", msgs[-1]
    reference = next(m for m in msgs if m.type == protocol.REFERENCE)
    assert reference.get("file") == "My Crate" and reference.get("score") == 1.0
    thumbs = reference.arrays["thumbnails"]
    front = np.frombuffer(thumbs.data, np.uint8).reshape(thumbs.shape)[0].reshape(-1, 3).astype(int)
    assert ((front[:, 0] > 150) & (front[:, 1] < 60)).mean() > 0.1  # the object's own red texture

    broken = {k: v for k, v in arrays.items() if k != "reference_triangles"}
    submit(sock, broken, reference_object="My Crate", reference_loop_count=36)
    error = read_until(sock, protocol.DONE, protocol.ERROR)[-1]
    assert error.type == protocol.ERROR and "'reference_triangles'" in error.get("message")
    protocol.send(sock, protocol.SUBMIT, {"task": protocol.TASK_SEARCH, "prompt": "a crate"})
    error = read_until(sock, protocol.DONE, protocol.ERROR)[-1]
    assert error.type == protocol.ERROR and "no asset library" in error.get("message")


def test_references_the_artist_names_come_first_with_their_captions(tmp_path: Path) -> None:
    from backend.jobs import JobRequest
    from backend.retrieve import choose

    lib = small_library(tmp_path)
    (lib / "metal_barrel.ply.txt").write_text("a rusty oil drum")
    request = JobRequest.from_fields({"prompt": "a crate", "references": [str(lib / "metal_barrel.ply"),
                                                                           str(lib / "wooden_crate.glb")]})
    chosen = choose(request, None, 3, None)
    assert [c.caption for c in chosen] == ["a rusty oil drum", "wooden crate"]
    assert all(c.score == 1.0 and c.thumbnails.shape == (4, 64, 64, 3) for c in chosen)
    with pytest.raises(MeshError, match="nope.glb"):
        choose(replace(request, references=(str(lib / "nope.glb"),)), None, 3, None)


def denoising_loss(prior, latents: torch.Tensor, embeds: torch.Tensor) -> float:
    """The UNet's ε error on fixed noise and timesteps: how well it knows these views."""
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.linspace(100, 900, len(latents)).long()
    a = prior.schedule.alphas_cumprod[t].float().sqrt().view(-1, 1, 1, 1)
    s = (1 - prior.schedule.alphas_cumprod[t].float()).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        out = prior.unet(a * latents + s * noise, t, encoder_hidden_states=embeds).sample
    return float((out - noise).square().mean())


def test_adaptation_learns_the_references_is_cached_and_leaves_the_model_as_it_was(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    from backend.adapt import adapted, training_views
    from backend.presets import Adaptation
    from backend.prior import load_prior
    from backend.retrieve import Chosen

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    prior = load_prior("tiny", torch.device("cpu"))
    mesh, _, target = exact_case()
    chosen = [Chosen(Asset(mesh, texture=target), "wooden crate", "crate.glb", 1.0, np.zeros((4, 8, 8, 3), np.uint8))]
    cfg = Adaptation(views=6, steps=60, batch=4, lr=5e-3)
    images, captions = training_views(chosen, cfg, prior.resolution, 1.0, seed=1, device=prior.device)
    assert images.shape == (6, 3, 64, 64) and captions[0].startswith("wooden crate, ") and len(set(captions)) > 1
    latents = prior.encode(images).detach()
    embeds = torch.stack([prior.encode_prompt(c, "")[1] for c in captions])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompt = prior.encode_prompt("a crate", "")
    base_eps = prior.predict_eps(x, 500, prompt, None)[1]
    before = denoising_loss(prior, latents, embeds)

    class Log(TextureEvents):
        lines: list[str] = []

        def log(self, text):
            self.lines.append(text)

    with adapted(prior, "tiny", chosen, cfg, 1.0, 0, Log(), 100):
        learned = denoising_loss(prior, latents, embeds)
        assert any("lora" in name for name, _ in prior.unet.named_parameters())
    assert learned < 0.8 * before, (before, learned)
    assert not any("lora" in name for name, _ in prior.unet.named_parameters())
    assert torch.equal(prior.predict_eps(x, 500, prompt, None)[1], base_eps)
    assert len(list((tmp_path / "cache" / "lora").glob("*.safetensors"))) == 1

    with adapted(prior, "tiny", chosen, cfg, 1.0, 0, Log(), 100):  # the same references: from the cache
        assert denoising_loss(prior, latents, embeds) == pytest.approx(learned, abs=1e-6)
    assert any("reusing the LoRA" in line for line in Log.lines)
    with pytest.raises(ModelError, match="no network weights"):
        with adapted(exact_case()[1], "exact", chosen, cfg, 1.0, 0, Log(), 100):
            pass
    # A cache that cannot be written (a full disk, a read-only home) costs the cache, not the job.
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "lora").write_text("a file where the folder goes")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "full"))
    with adapted(prior, "tiny", chosen, replace(cfg, steps=2), 1.0, 0, Log(), 100):
        assert any("lora" in name for name, _ in prior.unet.named_parameters())
    assert any(line.startswith("could not keep the trained LoRA") for line in Log.lines), Log.lines


def test_delta_denoising_cancels_the_prior_where_the_render_is_the_reference() -> None:
    """ReDream's delta denoising subtracts the residual at the reference's views with the same t
    and noise: a render equal to the reference gets no gradient; one that differs gets the
    difference of the two residuals."""
    from backend.distill import distill_loss

    mesh, prior, target = exact_case()
    cfg = PRESETS["sds"]["pipeline-check"]
    cams = orbit(mesh.positions, [0.0, 90.0], [20.0, 20.0], "y")
    views, _ = Asset(mesh, texture=target).render(cams, 32, 1.0)
    x = prior.encode(views).requires_grad_(True)

    def loss(delta_x):
        return float(distill_loss(prior, cfg, x, 600, prior.encode_prompt("crate", ""), Views(cams),
                                  torch.Generator().manual_seed(0), delta_x=delta_x).detach())

    assert loss(x.detach()) == 0.0
    other = prior.encode(torch.full_like(views, 0.5))
    assert loss(other) > 0 and loss(other) != pytest.approx(loss(None))


def test_reference_options_are_checked_before_anything_loads(tmp_path: Path) -> None:
    """A reference that is a folder was said not to exist, and one Kiln cannot read (a .txt, a
    .blend) was refused only after the model loaded: minutes, with a first download."""
    from backend.jobs import JobError, JobRequest, ModelCache, run_texture_job

    mesh = box_mesh()
    for name in ("notes.txt", "scene.blend"):
        (tmp_path / name).write_text("not a mesh")
    for fields, fragment in (({"adapt_prior": True}, "Adapt Model works from.*--reference or --library in the CLI"),
                             ({"delta_denoising": True, "method": "sds"}, "Delta Denoising works from references"),
                             ({"delta_denoising": True, "references": ["x.glb"]}, "choose SDS or SSD"),
                             ({"references": [str(tmp_path)]}, "is a folder: name one asset file in it, or retrieve"),
                             ({"references": [str(tmp_path / "x.glb")]}, "does not exist"),
                             ({"references": [str(tmp_path / "notes.txt")]}, r"is a \.txt file, and Kiln reads \.glb"),
                             ({"references": [str(tmp_path / "scene.blend")]}, "is a Blender file: export the asset")):
        request = JobRequest.from_fields({"prompt": "a crate", **fields})
        cache = ModelCache()
        with pytest.raises(JobError, match=fragment):
            run_texture_job(request, mesh, TextureEvents(), cache)
        assert not cache.priors


def test_a_job_adapts_the_model_and_denoises_against_its_references(tmp_path: Path, monkeypatch) -> None:
    """SDS with two named references, adaptation and delta denoising, end to end on the tiny model;
    the cached model comes out of the job unadapted."""
    from backend.jobs import JobRequest, ModelCache, run_texture_job

    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    lib = small_library(tmp_path / "lib")
    lines: list[str] = []

    class Log(TextureEvents):
        def log(self, text):
            lines.append(text)

    models = ModelCache()
    request = JobRequest.from_fields({"prompt": "a wooden crate", "method": "sds", "texture_size": 512, "steps": 4,
                                      "references": [str(lib / "wooden_crate.glb"), str(lib / "metal_barrel.ply")],
                                      "adapt_prior": True, "delta_denoising": True})
    texture = run_texture_job(request, box_mesh(), Log(), models)
    assert texture.shape == (3, 512, 512) and torch.isfinite(texture).all()
    assert any("adapting the model to 2 reference(s)" in line for line in lines), lines
    assert any(line.startswith("warming up toward wooden_crate.glb") for line in lines), lines
    prior = next(iter(models.priors.values()))
    assert not any("lora" in name for name, _ in prior.unet.named_parameters())
