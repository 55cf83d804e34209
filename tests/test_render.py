"""The CPU rasteriser and texture sampling against analytic cases."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import ROOT

from backend.cameras import look_at, orbit, perspective
from backend.mesh import Mesh
from backend.raster import interpolate, rasterize, rasterize_views
from backend.texture import (
    PyramidTexture,
    pad_islands,
    render,
    sample_image,
    shared_uv_area,
    spread_grid_sample,
    uv_coverage,
)


def test_textured_quad_from_a_known_camera_matches_the_analytic_lookup() -> None:
    """A unit quad at z=0 seen head-on by a perspective camera at distance d covers exactly the
    pixels the pinhole model predicts, and each pixel shows the texel at its analytic UV."""
    size, fov, dist = 64, 60.0, 2.0
    verts = torch.tensor([[-0.5, -0.5, 0], [0.5, -0.5, 0], [0.5, 0.5, 0], [-0.5, 0.5, 0]], dtype=torch.float64)
    tris = torch.tensor([[0, 1, 2], [0, 2, 3]])
    mvp = perspective(fov, 0.1, 10) @ look_at(np.array([0, 0, dist]), np.zeros(3), np.array([0, 1.0, 0]))
    clip = (torch.cat([verts, torch.ones(4, 1, dtype=torch.float64)], 1) @ torch.tensor(mvp).T).float()
    raster = rasterize(clip[None], tris, size, size)
    # Analytic: the quad's half-width in NDC is 0.5 / (d tan(fov/2)).
    half = 0.5 / (dist * math.tan(math.radians(fov / 2)))
    centres = (torch.arange(size) + 0.5) / size * 2 - 1
    inside = (centres.abs() < half)
    expected = inside[:, None] & inside[None, :]
    assert torch.equal(raster.mask[0], expected)
    corner_uvs = torch.tensor([[[0, 0], [1, 0], [1, 1]], [[0, 0], [1, 1], [0, 1]]], dtype=torch.float32)
    uv = interpolate(corner_uvs, raster)[0]
    analytic_u = (centres / half + 1) / 2
    ys, xs = torch.nonzero(expected, as_tuple=True)
    assert torch.allclose(uv[ys, xs, 0], analytic_u[xs], atol=1e-5)
    assert torch.allclose(uv[ys, xs, 1], analytic_u[ys], atol=1e-5)  # row 0 is the bottom, as nvdiffrast


def test_perspective_correct_barycentrics_on_a_tilted_plane() -> None:
    """On a plane receding in depth, screen-linear interpolation would be wrong; the rasteriser
    must return the true surface point: each pixel's ray hits the plane where UV says."""
    fov, size = 50.0, 48
    proj = perspective(fov, 0.1, 20)
    verts = np.array([[-1, -1, -2], [1, -1, -2], [1, 1, -6], [-1, 1, -6]], dtype=np.float64)  # camera space
    clip = torch.tensor(np.c_[verts, np.ones(4)] @ proj.T, dtype=torch.float32)
    tris = torch.tensor([[0, 1, 2], [0, 2, 3]])
    raster = rasterize(clip[None], tris, size, size)
    corner_pos = torch.tensor(verts, dtype=torch.float32)[tris]
    pos = interpolate(corner_pos, raster)[0]
    ys, xs = torch.nonzero(raster.mask[0], as_tuple=True)
    t = math.tan(math.radians(fov / 2))
    ndc_x = (xs + 0.5) / size * 2 - 1
    ndc_y = (ys + 0.5) / size * 2 - 1
    p = pos[ys, xs]
    assert torch.allclose(p[:, 0] / -p[:, 2], ndc_x * t, atol=1e-4)
    assert torch.allclose(p[:, 1] / -p[:, 2], ndc_y * t, atol=1e-4)
    assert raster.mask.sum() > 200


def test_cube_front_faces_hide_back_faces() -> None:
    """Seen from +Z, every covered pixel of a cube shows one of the two +Z triangles."""
    v = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float32)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = torch.tensor([(q[0], q[1], q[2]) for q in quads] + [(q[0], q[2], q[3]) for q in quads])
    cams = orbit(v.numpy(), [0.0], [0.0], "y")
    clip = torch.cat([v, torch.ones(8, 1)], 1) @ cams.mvp[0].T
    raster = rasterize(clip[None], tris, 64, 64)
    front = {i for i, t in enumerate(tris.tolist()) if all(v[j, 2] > 0 for j in t)}
    seen = set(raster.tri_id[0][raster.mask[0]].unique().tolist())
    assert seen == front



def test_views_of_a_part_frame_it_from_outside_the_whole_mesh() -> None:
    """Repainting a small patch of a long box: the views frame the patch, many times larger than
    whole-mesh views show it, from cameras outside the box that clip none of it; a part as large as
    the mesh is framed as the whole mesh is, and a speck no closer than ``MAX_ZOOM``."""
    from backend.cameras import MAX_ZOOM

    box = np.array([[x, y, z] for x in (-4, 4) for y in (-1, 1) for z in (-1, 1)], np.float64)
    patch = np.array([[3.8, 1, -0.2], [4, 1, -0.2], [4, 1, 0.2], [3.8, 1, 0.2]])  # on the +Y side, at one end
    points = np.concatenate([box, patch])
    azimuths, elevations = [0.0, 90.0, 180.0, 270.0], [0.0, 30.0, -30.0, 60.0]

    def ndc(cams, part: np.ndarray) -> torch.Tensor:
        clip = torch.as_tensor(np.c_[part, np.ones(len(part))], dtype=torch.float32) @ cams.mvp.transpose(1, 2)
        return clip[..., :3] / clip[..., 3:]

    def size(cams) -> np.ndarray:  # the patch's bounding box on screen, per view (the screen is 2 wide)
        xy = ndc(cams, patch)[..., :2]
        return torch.linalg.norm(xy.amax(1) - xy.amin(1), dim=1).numpy()

    whole = orbit(points, azimuths, elevations, "z")
    zoomed = orbit(points, azimuths, elevations, "z", focus=patch)
    centre = patch.mean(0)
    assert (torch.linalg.norm(zoomed.eyes - torch.as_tensor(centre, dtype=torch.float32), dim=1) >
            float(np.linalg.norm(box - centre, axis=1).max())).all()  # outside everything around the patch
    assert (ndc(zoomed, patch)[..., :2].abs() <= 1).all() and (size(zoomed) > 4 * size(whole)).all()
    depth = ndc(zoomed, points)[..., 2]
    assert (depth > -1).all() and (depth < 1).all()  # nothing of the box in front of the near plane or past the far
    same = orbit(points, azimuths, elevations, "z", focus=box)
    assert torch.allclose(same.mvp, orbit(box, azimuths, elevations, "z").mvp)
    speck = orbit(points, azimuths, elevations, "z", focus=patch[:1] + [[0, 0, 0]])
    extent = float(np.linalg.norm(points - patch[0], axis=1).max())
    assert math.isclose(float(speck.eyes[0].sub(torch.as_tensor(patch[0])).norm()), extent * 1.5, rel_tol=1e-5)
    assert math.isclose(math.sin(math.radians(speck.fov_y_deg) / 2), extent / MAX_ZOOM * 1.1 / (extent * 1.5),
                        rel_tol=1e-5)


def test_views_of_a_one_sided_part_stand_where_it_shows() -> None:
    """Repainting one side of a sphere: the views keep to the azimuths (a cap facing +X) or the
    elevations (a cap on top) from which the part shows, so each of them sees some of it and the
    part fills more of the views than on a whole ring, where some views see none; parts that show
    all round (a band, the whole sphere) keep the whole ring and every elevation. A sphere wound
    inside out gets the same views."""
    import trimesh

    from backend.cameras import FULL_RING, facing_views, ring
    from backend.presets import ELEVATIONS

    sphere = trimesh.creation.icosphere(3)
    positions, triangles = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    normals = np.asarray(sphere.face_normals)

    def on_sphere(wound: np.ndarray, paint: np.ndarray) -> Mesh:
        return Mesh(positions, wound, None, up_axis="z", paint=paint)

    def painted_share(paint: np.ndarray, arc: tuple[float, float], elevations: tuple[float, ...]) -> np.ndarray:
        rng, shares = np.random.default_rng(0), []
        for _ in range(3):
            focus = positions[triangles[paint]].reshape(-1, 3)
            cams = orbit(positions, *ring(8, elevations, rng, 20.0, arc), "z", focus=focus)
            tri_id = rasterize_views(torch.as_tensor(positions, dtype=torch.float32), torch.as_tensor(triangles),
                                     cams.mvp, 64).tri_id
            shares.append(((tri_id >= 0) & torch.as_tensor(paint)[tri_id.clamp(min=0)]).float().mean((1, 2)))
        return torch.cat(shares).numpy()

    side, top = normals[:, 0] > 0.6, normals[:, 2] > 0.5
    (first, width), elevations = facing_views(on_sphere(triangles, side), ELEVATIONS)
    assert width < 240 and abs((first + width / 2) % 360 - 90) < 10 and elevations == ELEVATIONS  # +X: azimuth 90
    arc, up_elevations = facing_views(on_sphere(triangles, top), ELEVATIONS)
    assert arc == FULL_RING and set(up_elevations) == {e for e in ELEVATIONS if e > 0}
    for paint, arc, kept in ((side, (first, width), elevations), (top, arc, up_elevations)):
        whole, facing = painted_share(paint, FULL_RING, ELEVATIONS), painted_share(paint, arc, kept)
        assert (whole == 0).any() and (facing > 0.02).all() and facing.mean() > 1.5 * whole.mean()
    for paint in (np.abs(normals[:, 2]) < 0.3, np.ones(len(triangles), bool)):
        assert facing_views(on_sphere(triangles, paint), ELEVATIONS) == (FULL_RING, ELEVATIONS)
    # Imported inside out (every face wound the other way): the same side is found.
    assert facing_views(on_sphere(triangles[:, ::-1], side), ELEVATIONS) == ((first, width), elevations)
    # An open terrain, mostly low with one peak (its signed volume negative): it faces up, as wound.
    x, y = np.meshgrid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 9))
    ground = np.c_[x.ravel(), y.ravel(), np.where((x == 0) & (y == 0), 2.0, 0.0).ravel()]
    cells = np.array([[i * 9 + j, i * 9 + j + 1, (i + 1) * 9 + j + 1] for i in range(8) for j in range(8)]
                     + [[i * 9 + j, (i + 1) * 9 + j + 1, (i + 1) * 9 + j] for i in range(8) for j in range(8)])
    assert set(facing_views(Mesh(ground, cells, None, paint=np.ones(len(cells), bool)), ELEVATIONS)[1]) == {25.0, 60.0}


def test_views_of_a_cups_inside_stand_above_it() -> None:
    """Repainting a cup's inside: its walls face every way, but the floor and the outer wall hide
    them from below, so the views keep to the elevations above the rim. Without the renders that
    count what shows, every elevation was kept. The cup is the repaint bench's."""
    sys.path.insert(0, str(ROOT / "bench"))
    from quality import cup

    from backend.cameras import FULL_RING, facing_views
    from backend.presets import ELEVATIONS

    mesh, inside = cup()
    arc, elevations = facing_views(replace(mesh, paint=inside), ELEVATIONS)
    assert arc == FULL_RING and set(elevations) == {e for e in ELEVATIONS if e > 0}


def test_uv_coverage_of_a_triangle_matches_its_area() -> None:
    tri = torch.tensor([[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]]])
    cover = uv_coverage(tri, 256)
    assert cover.float().mean().item() == pytest.approx(0.5 * 0.8 * 0.8, rel=0.02)
    assert cover[5, 5].item() is False and cover[40, 40].item() is True  # row 0 is v = 0


def test_uvs_outside_the_unit_square_wrap_into_it_as_blenders_repeat() -> None:
    """A triangle moved by whole tiles covers and samples the texels it covered unmoved; one that
    straddles a tile's edge covers both ends of the square; stacked and tiled UVs share area."""
    tri = torch.tensor([[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]]])
    assert torch.equal(uv_coverage(tri + torch.tensor([3.0, -2.0]), 64), uv_coverage(tri, 64))
    straddling = uv_coverage(torch.tensor([[[0.8, 0.4], [1.2, 0.4], [0.8, 0.6]]]), 64)
    assert straddling[27, 56].item() and straddling[27, 6].item() and not straddling[27, 32].item()
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    uv = torch.rand(100, 2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sample_image(image, uv + torch.tensor([-1.0, 2.0])), sample_image(image, uv), atol=1e-5)
    edge = torch.tensor([[1.0, 0.5], [0.0, 0.5]])  # the square's own edges stay where they are
    assert not torch.allclose(sample_image(image, edge)[0], sample_image(image, edge)[1])
    assert shared_uv_area(tri) < 0.02
    assert shared_uv_area(torch.cat([tri, tri])) == pytest.approx(0.5, abs=0.02)
    # Twice the square's area, once over all of it: half is shared.
    assert shared_uv_area(torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]]])) == pytest.approx(0.5, abs=0.02)
    # Every face of a 5,000-quad mesh on the whole square: checked on a coarser grid, not 10,000 full-size rasters.
    square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    quads = square.repeat(5000, 1, 1)
    assert shared_uv_area(quads) == pytest.approx(1 - 1 / 5000)


def test_a_map_over_several_uv_tiles_gets_one_cell_per_tile() -> None:
    """Faces in UDIM tiles 1001, 1002 and 1011, each within its tile: packed, they keep their place
    within the tile and land in their tile's cell, clear of the other tiles' faces. Maps that
    repeat (a face over several squares) or stay in one tile are left as they are."""
    from backend.protocol import TILE_MARGIN, tile_cell
    from backend.tiles import tile_layout

    tri = np.float32([[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]]])
    # In tiles 1002, 1001, 1011 and 1002 again.
    corner_uvs = np.concatenate([tri + [1, 0], tri, tri + [0, 1], tri + [1, 0]]).astype(np.float32)
    layout = tile_layout(corner_uvs)
    assert layout.tiles.tolist() == [[0, 0], [1, 0], [0, 1]] and layout.triangle_tile.tolist() == [1, 0, 2, 1]
    assert layout.describe() == "UDIM tiles 1001, 1002, 1011"
    packed = layout.pack(corner_uvs)
    # Of four faces, three lie on others when wrapped into one square; packed, only the one stacked
    # within tile 1002 (as the artist laid it out) does.
    assert shared_uv_area(torch.as_tensor(corner_uvs)) == pytest.approx(0.75, abs=0.02)
    assert shared_uv_area(torch.as_tensor(packed)) == pytest.approx(0.25, abs=0.02)
    assert packed.min() >= TILE_MARGIN / 2 and packed.max() <= 1 - TILE_MARGIN / 2
    scale, du, dv = tile_cell(1, 3)
    assert np.allclose(packed[0], tri[0] * scale + [du, dv]) and np.array_equal(packed[0], packed[3])
    assert [tile_cell(i, 4)[1:] for i in range(4)] == [(a + TILE_MARGIN / 2, b + TILE_MARGIN / 2)
                                                      for b in (0, 0.5) for a in (0, 0.5)]
    assert tile_cell(0, 5)[0] == pytest.approx((1 - 2 * TILE_MARGIN) / 3)  # five tiles: a 3 × 3 grid
    assert tile_layout(tri) is None and tile_layout(tri + [3, -2]) is None  # one tile: Blender's repeat shows it
    assert tile_layout(np.concatenate([tri, tri + [0.5, 0]])) is None  # a face over two squares repeats
    assert tile_layout(np.concatenate([tri, tri - [1, 0]])).describe() == "2 UV tiles"  # left of UDIM's 1001


def test_padding_grows_islands_without_touching_them() -> None:
    image = torch.zeros(3, 32, 32)
    image[:, 10:20, 10:20] = torch.tensor([0.2, 0.5, 0.8])[:, None, None]
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[10:20, 10:20] = True
    padded = pad_islands(image, inside, texels=3)
    assert torch.equal(padded[:, 10:20, 10:20], image[:, 10:20, 10:20])
    assert torch.allclose(padded[:, 7:23, 7:23], torch.tensor([0.2, 0.5, 0.8])[:, None, None].expand(3, 16, 16))
    assert padded[:, 5, 5].sum() == 0  # beyond the padding width nothing changes


def test_pyramid_texture_fits_a_target_view_and_fills_unseen_texels() -> None:
    torch.manual_seed(0)
    v = torch.tensor([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], dtype=torch.float32)
    tris = torch.tensor([[0, 1, 2], [0, 2, 3]])
    corner_uvs = torch.tensor([[[0, 0], [0.5, 0], [0.5, 1]], [[0, 0], [0.5, 1], [0, 1]]], dtype=torch.float32)
    cams = orbit(v.numpy(), [0.0], [0.0], "y")
    clip = torch.cat([v, torch.ones(4, 1)], 1) @ cams.mvp[0].T
    raster = rasterize(clip[None], tris, 32, 32)
    texture = PyramidTexture(64, "cpu")
    target = torch.full((1, 3, 32, 32), 0.5)
    target[:, 0] = 0.9
    optimiser = torch.optim.Adam(texture.parameters(), lr=0.05)
    mask = raster.mask[:, None].flip(2).float()
    losses = []
    for _ in range(60):
        loss = (((render(texture.sample, corner_uvs, raster, 1.0) - target) * mask) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.05
    full = texture.compose()
    assert full[0, :, :32].mean() > 0.8                  # the seen half is red
    assert full[0, :, 40:].mean() > 0.6                  # the unseen half took its neighbours' colour


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("size", [1, 4, 37])
def test_sampling_spread_over_copies_gives_the_same_values_and_gradients(size: int, device: str) -> None:
    generator = torch.Generator().manual_seed(size)
    image = torch.rand(1, 3, size, size, generator=generator).to(device).requires_grad_()
    uv = (torch.rand(1001, 2, generator=generator) * 1.2 - 0.1).to(device)  # some outside [0, 1]: border
    weights = torch.rand(1001, 3, generator=generator).to(device)
    outputs, grads = [], []
    for copies in (1, 8, 1001):                                     # 1001 / 8 leaves padding points
        out = spread_grid_sample(image, uv, copies)
        (grad,) = torch.autograd.grad((out * weights).sum(), image)
        outputs.append(out)
        grads.append(grad)
    for out, grad in zip(outputs[1:], grads[1:]):
        assert torch.allclose(out, outputs[0], atol=1e-6)
        assert torch.allclose(grad, grads[0], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvdiffrast needs CUDA; runs on GPU machines")
def test_nvdiffrast_and_the_torch_rasteriser_agree() -> None:
    import trimesh

    mesh = trimesh.creation.icosphere(subdivisions=4)
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    tris = torch.tensor(mesh.faces)
    cams = orbit(mesh.vertices, [0.0, 120.0, 240.0], [20.0, -10.0, 45.0], "y")
    clip = torch.cat([v, torch.ones(len(v), 1)], 1) @ cams.mvp.transpose(1, 2)
    cpu = rasterize(clip, tris, 256, 256, backend="torch")
    gpu = rasterize(clip.cuda(), tris.cuda(), 256, 256, backend="nvdiffrast")
    same = (cpu.tri_id == gpu.tri_id.cpu())
    assert same.float().mean() > 0.995  # edge pixels may go to either neighbour
    both = same & cpu.mask
    assert torch.allclose(cpu.bary[both], gpu.bary.cpu()[both], atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CUDA texture path with the CPU's")
def test_textured_views_and_their_gradients_agree_on_cuda_and_cpu() -> None:
    """One raster, the same pyramid texture: CUDA's views (pixels looked up once, gradients spread
    over copies of each level) and the texture's gradients match the CPU's."""
    import trimesh

    from backend.raster import Raster
    from backend.texture import PixelLookup

    mesh = trimesh.creation.icosphere(subdivisions=3)
    v, tris = torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces)
    corner_uvs = torch.rand(len(tris), 3, 2, generator=torch.Generator().manual_seed(0))
    cams = orbit(mesh.vertices, [0.0, 120.0, 240.0], [20.0, -10.0, 45.0], "y")
    raster = rasterize_views(v, tris, cams.mvp, 128)
    results = []
    for device in ("cpu", "cuda"):
        texture = PyramidTexture(256, device)
        with torch.no_grad():
            for i, level in enumerate(texture.levels):
                level.copy_(torch.randn(level.shape, generator=torch.Generator().manual_seed(i)))
        on = Raster(raster.tri_id.to(device), raster.bary.to(device))
        images = PixelLookup(corner_uvs.to(device), on).render(texture.sample, 1.0)
        grads = torch.autograd.grad((images * torch.linspace(0, 1, 128, device=device)).sum(), list(texture.levels))
        results.append((images.cpu(), [g.cpu() for g in grads]))
    (cpu_images, cpu_grads), (gpu_images, gpu_grads) = results
    assert torch.allclose(cpu_images, gpu_images, atol=1e-5)
    for cpu_grad, gpu_grad in zip(cpu_grads, gpu_grads, strict=True):
        assert torch.allclose(cpu_grad, gpu_grad, rtol=1e-4, atol=1e-3)


def test_inpainting_fills_unseen_texels_from_seen_ones_only() -> None:
    from backend.texture import inpaint

    image = torch.zeros(3, 32, 32)
    image[0, :, :12] = 1.0                        # seen: red on the left
    image[2, :, 12:] = 1.0                        # unseen garbage (blue) on the right
    known = torch.zeros(32, 32, dtype=torch.bool)
    known[:, :12] = True
    out = inpaint(image, known)
    assert torch.equal(out[:, :, :12], image[:, :, :12])
    assert torch.allclose(out[:, :, 12:], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 32, 20))


def test_facing_weights_are_the_cosine_to_the_view_ray() -> None:
    from backend.texturing import facing_weights

    angle = math.radians(60)
    quad = torch.tensor([[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], dtype=torch.float32)
    rot = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]],
                       dtype=torch.float32)
    for tilt, expected in ((torch.eye(3), 1.0), (rot, 0.5)):
        positions = quad @ tilt.T
        tris = torch.tensor([[0, 1, 2], [0, 2, 3]])
        cams = orbit(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), [0.0], [0.0], "y")
        raster = rasterize_views(positions, tris, cams.mvp, 64)
        weights = facing_weights(positions, tris, cams, raster)
        assert weights[0, 0, 32, 32].item() == pytest.approx(expected, abs=0.02)
        assert weights[0, 0][~raster.mask[0].flip(0)].abs().max() == 0
