"""Generating objects: Gaussian rendering, marching cubes, the pipeline on the CPU, the server and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BackendServer, read_until

from backend import protocol, splat
from backend.cameras import orbit_sphere, ring, sphere_directions
from backend.events import TextureEvents
from backend.exact_prior import ExactPrior, Reference
from backend.generate import FRAME_RADIUS, SplatOptimiser, generate_object
from backend.meshing import clean, density_grid, extract, extraction_level, hidden, surface
from backend.presets import GENERATE_PRESETS, MeshConfig, SIRConfig
from backend.prior import Prompts, Views, load_prior

ROOT = Path(__file__).resolve().parents[1]


def one_gaussian(mean, scales, opacity_logit=2.0, color_logit=(3.0, -3.0, -3.0)) -> torch.nn.ParameterDict:
    return torch.nn.ParameterDict({
        "means": torch.nn.Parameter(torch.tensor([mean], dtype=torch.float32)),
        "scales": torch.nn.Parameter(torch.log(torch.tensor([scales], dtype=torch.float32))),
        "quats": torch.nn.Parameter(torch.tensor([[1.0, 0, 0, 0]])),
        "opacities": torch.nn.Parameter(torch.tensor([opacity_logit])),
        "colors": torch.nn.Parameter(torch.tensor([color_logit])),
    })


def test_marching_cubes_recovers_an_analytic_sphere() -> None:
    r, res = 0.6, 48
    axis = (np.arange(res) + 0.5) / res * 2 - 1
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    dist = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    grid = np.exp(-dist ** 2 / (2 * 0.3 ** 2))
    grid += (np.sqrt((x - 0.85) ** 2 + y ** 2 + z ** 2) < 0.08)  # a floater the clean-up must drop
    mesh = clean(*surface(grid, math.exp(-r ** 2 / (2 * 0.3 ** 2))), MeshConfig(face_budget=3000), "sphere")
    radii = np.linalg.norm(mesh.positions, axis=1)
    assert abs(radii.mean() - r) < 0.01 and radii.std() < 0.01
    assert mesh.triangle_count <= 3000
    import trimesh

    tm = trimesh.Trimesh(mesh.positions, mesh.triangles)
    assert tm.is_watertight and len(tm.split()) == 1
    assert tm.volume == pytest.approx(4 / 3 * math.pi * r ** 3, rel=0.03)  # positive: normals point out


def test_smoothing_takes_out_the_grids_steps_and_keeps_the_size() -> None:
    """A voxelised ball meshes as stairs; Taubin's passes flatten them without shrinking it."""
    r, res = 0.6, 48
    axis = (np.arange(res) + 0.5) / res * 2 - 1
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    ball = (np.sqrt(x ** 2 + y ** 2 + z ** 2) < r).astype(np.float32)
    radii = [np.linalg.norm(clean(*surface(ball, 0.5), MeshConfig(smooth_iterations=n), "ball").positions, axis=1)
             for n in (0, 10)]
    assert radii[1].std() < 0.7 * radii[0].std()
    assert radii[1].mean() == pytest.approx(radii[0].mean(), abs=0.002)


def test_clean_up_keeps_a_thin_leg_and_drops_a_speck() -> None:
    """A table's leg and a floater both come out of marching cubes as small separate parts; the
    leg is long, so it stays, and the compact speck goes."""
    import trimesh

    res = 64
    axis = (np.arange(res) + 0.5) / res * 2 - 1
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    top = (np.abs(x) < 0.8) & (np.abs(y) < 0.8) & (np.abs(z - 0.5) < 0.15)
    leg = (np.abs(x - 0.5) < 0.03) & (np.abs(y - 0.5) < 0.03) & (z > -0.7) & (z < 0.3)
    speck = np.sqrt((x + 0.5) ** 2 + (y + 0.5) ** 2 + (z + 0.3) ** 2) < 0.1
    mesh = clean(*surface((top | leg | speck).astype(np.float32), 0.5), MeshConfig(), "table")
    parts = trimesh.Trimesh(mesh.positions, mesh.triangles).split(only_watertight=False)
    assert len(parts) == 2 and min(len(p.faces) for p in parts) < 0.05 * max(len(p.faces) for p in parts)
    assert mesh.positions[:, 2].min() < -0.65                                        # the leg's foot
    assert not (np.linalg.norm(mesh.positions - [-0.5, -0.5, -0.3], axis=1) < 0.15).any()  # no speck


def test_faint_gaussians_are_extracted_lower_and_none_at_all_refused() -> None:
    faint = np.zeros((16, 16, 16))
    faint[6:10, 6:10, 6:10] = 0.3
    assert extraction_level(faint, 1.0) == pytest.approx(0.15)
    assert extraction_level(faint * 10, 1.0) == 1.0
    with pytest.raises(ValueError, match="faded"):
        surface(np.zeros((8, 8, 8)), extraction_level(np.zeros((8, 8, 8)), 1.0))


@pytest.mark.parametrize("thickness_filter, normal_cells", [(0.0, None), (1.25, None), (1.25, 0.4)])
def test_density_grid_matches_the_closed_form_of_one_gaussian(thickness_filter: float,
                                                              normal_cells: float | None) -> None:
    """The Gaussian as the grid samples it: each σ widened in quadrature by the filter's cells (its
    own number along the smallest axis, x here) and by a multiple of its own smallest σ."""
    params = one_gaussian([0.2, 0.0, -0.1], [0.1, 0.2, 0.3])
    grid = density_grid(params, 32, 0.7, thickness_filter, normal_cells)
    axis = (np.arange(32) + 0.5) / 32 * 2 - 1
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    cells = np.array([0.7 if normal_cells is None else normal_cells, 0.7, 0.7])
    var = np.array([0.1, 0.2, 0.3]) ** 2 + (cells * 2 / 32) ** 2 + (thickness_filter * 0.1) ** 2
    q = (x - 0.2) ** 2 / var[0] + y ** 2 / var[1] + (z + 0.1) ** 2 / var[2]
    expected = 1 / (1 + math.exp(-2.0)) * np.exp(-0.5 * q)
    assert np.abs(grid - expected).max() < 1e-5


def flat_sheet(z: float, count: int = 31, half: float = 0.3, thin: float = 0.002) -> torch.nn.ParameterDict:
    """A square of flat discs, ``thin`` across, in the plane at height ``z``: a sail, a leaf."""
    xs = torch.linspace(-half, half, count)
    x, y = torch.meshgrid(xs, xs, indexing="ij")
    points = torch.stack([x.flatten(), y.flatten(), torch.full((count * count,), z)], 1)
    sheet = splat.surface(points, torch.full((len(points), 3), 0.5), (2 * half) ** 2, "cpu")
    sheet["scales"].data[:, 2] = math.log(thin)
    return sheet


def test_gaussians_thinner_than_a_cell_are_not_lost_between_its_samples() -> None:
    """A sheet far thinner than a grid cell, midway between two layers of cell centres (z = 0 at
    grid 128), meshes at the configured level as one part; sampled as it is, it all but vanishes."""
    import trimesh

    sheet, cfg = flat_sheet(0.0), MeshConfig(face_budget=20_000)
    mesh, level = extract(sheet, cfg, "sail", 64)
    assert level == cfg.density_threshold
    parts = trimesh.Trimesh(mesh.positions, mesh.triangles).split(only_watertight=False)
    assert len(parts) == 1 and np.ptp(mesh.positions[:, :2], axis=0).min() > 0.6
    assert np.abs(mesh.positions[:, 2]).max() < 0.06
    # SIR's preset: widening each Gaussian by its own thickness leaves flat discs as thin as they were,
    # and the narrower filter along their normal meshes them thinner than the whole cell does, still whole.
    sir = replace(GENERATE_PRESETS["sir"]["quality"].mesh, face_budget=20_000)
    assert sir.thickness_filter > 0 and sir.normal_filter < sir.density_filter
    meshes = [extract(sheet, replace(sir, **change), "sail", 64)[0]
              for change in ({"thickness_filter": 0.0}, {}, {"normal_filter": None})]
    faces = [np.median(np.abs(m.positions[np.abs(m.positions[:, :2]).max(1) < 0.2, 2])) for m in meshes]
    assert faces[1] == pytest.approx(faces[0], abs=1e-3)
    assert faces[1] < faces[2] - 0.003
    assert len(trimesh.Trimesh(meshes[1].positions, meshes[1].triangles).split(only_watertight=False)) == 1
    assert np.ptp(meshes[1].positions[:, :2], axis=0).min() > 0.6
    on_layer = density_grid(flat_sheet(1 / 128), 128, cfg.density_filter).max()  # on a layer of cell centres
    assert density_grid(sheet, 128, cfg.density_filter).max() > 0.5 * on_layer
    assert density_grid(sheet, 128, 0.0).max() < 0.01 * density_grid(flat_sheet(1 / 128), 128, 0.0).max()


def test_jittered_elevations_stay_near_the_cycle_and_repeat_for_a_seed() -> None:
    """Jitter moves each view's height by at most its bound, keeps the azimuths, never tips a camera
    over a pole, and is drawn from the job's generator (a seed gives the same views again)."""
    cycle = (25.0, -25.0, 60.0, -55.0)
    plain_az, plain_el = ring(8, cycle, np.random.default_rng(3))
    assert plain_el == [cycle[k % 4] for k in range(8)]
    az, el = ring(8, cycle, np.random.default_rng(3), 20.0)
    assert az == plain_az
    moved = np.abs(np.subtract(el, plain_el))
    assert (moved <= 20.0).all() and (moved > 0).all()
    assert el == ring(8, cycle, np.random.default_rng(3), 20.0)[1]
    assert all(abs(e) <= 89.0 for e in ring(64, (85.0, -85.0), np.random.default_rng(0), 20.0)[1])


def test_torch_splatting_puts_one_gaussian_where_the_camera_projects_it() -> None:
    """A red Gaussian above the origin, seen from the front: centred horizontally, in the upper
    half, peak colour = opacity·red over the background, alpha = opacity."""
    params = one_gaussian([0.0, 0.0, 0.5], [0.15, 0.15, 0.15])
    cams = orbit_sphere(np.zeros(3), FRAME_RADIUS, [0.0], [0.0], "z")
    with torch.no_grad():
        out = splat.render(params, cams, 64, background=1.0)
    img, alpha = out.images[0], out.alphas[0, 0]
    row, col = divmod(int(alpha.argmax()), 64)
    clip = cams.mvp[0] @ torch.tensor([0.0, 0.0, 0.5, 1.0])
    expect_col = (clip[0] / clip[3] + 1) / 2 * 64
    expect_row = (1 - clip[1] / clip[3]) / 2 * 64
    assert abs(col + 0.5 - expect_col) <= 1 and abs(row + 0.5 - expect_row) <= 1 and row < 32
    opacity = 1 / (1 + math.exp(-2.0))
    assert float(alpha.max()) == pytest.approx(opacity, abs=0.03)
    assert float(img[0, row, col]) == pytest.approx(1.0, abs=0.05)           # red over white: stays 1
    green = 1 / (1 + math.exp(3.0))
    assert float(img[1, row, col]) == pytest.approx(1 - float(alpha[row, col]) * (1 - green), abs=1e-5)
    assert float(out.alphas[0, 0, 0, 0]) == 0.0 and float(img[:, 0, 0].min()) == 1.0   # background


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="gsplat's absgrad needs CUDA"))])
def test_absolute_screen_gradients_sum_each_pixels_part(device: str) -> None:
    """AbsGS's densification signal: each Gaussian's screen-space gradient with every pixel's part
    in absolute value, checked against one backward pass per pixel; it leaves the plain gradient
    as it is, and is larger wherever pixels pull a Gaussian different ways."""
    params = splat.sphere(40, 0.4, torch.Generator().manual_seed(0), device)
    cams = orbit_sphere(np.zeros(3), FRAME_RADIUS, [0.0, 150.0], [20.0, -30.0], "z", device=device)
    target = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    out = splat.render(params, cams, 16, 1.0, absgrad=True)
    out.info["means2d"].retain_grad()
    (out.images - target).square().sum().backward()
    plain, absolute = out.info["means2d"].grad, out.info["means2d"].absgrad
    brute = torch.zeros_like(absolute)
    for k, y, x in np.ndindex(2, 16, 16):
        pixel = splat.render(params, cams, 16, 1.0)
        loss = (pixel.images[k, :, y, x] - target[k, :, y, x]).square().sum()
        brute += torch.autograd.grad(loss, pixel.info["means2d"], allow_unused=True)[0].abs()
    assert torch.allclose(absolute, brute, rtol=1e-3, atol=1e-7)
    assert (absolute >= plain.abs() - 1e-7).all() and float((absolute - plain.abs()).max()) > 0


def test_depth_render_puts_one_gaussian_at_its_camera_depth() -> None:
    params = one_gaussian([0.1, 0.2, 0.3], [0.1, 0.1, 0.1])
    cams = orbit_sphere(np.zeros(3), FRAME_RADIUS, [30.0], [20.0], "z")
    depth, alpha = splat.render_depth(params, cams, 64)
    expected = float((cams.view_opencv()[0] @ torch.tensor([0.1, 0.2, 0.3, 1.0]))[2])
    covered = alpha[0] > 0.05
    assert covered.sum() > 20 and torch.allclose(depth[0][covered], torch.tensor(expected), atol=1e-4)
    assert torch.allclose(alpha, splat.render(params, cams, 64, 1.0).alphas[:, 0], atol=1e-6)


def shell(keep: float, count: int = 2000, r: float = 0.5) -> torch.nn.ParameterDict:
    """Opaque Gaussians on the sphere of radius ``r`` below height ``keep``·r: a closed ball's
    skin (keep = 1), or an open bowl (keep = 0). Nothing inside, as optimised Gaussians leave it."""
    az, el = sphere_directions(count)
    a, e = np.radians(az), np.radians(el)
    points = r * np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], 1)
    points = torch.tensor(points[points[:, 2] <= keep * r + 1e-6], dtype=torch.float32)
    return splat.surface(points, torch.full((len(points), 3), 0.5), 4 * math.pi * r ** 2, "cpu")


def test_extraction_fills_the_unseen_inside_and_leaves_a_seen_hollow_open() -> None:
    """Gaussians only on a ball's skin: marching cubes alone also gives the skin's inner wall;
    filling what no camera sees leaves the outer wall only, around a solid. An open bowl's inside
    is seen from above, so its inner wall stays."""
    import trimesh

    def extracted(params, fill_views):
        mesh, _ = extract(params, MeshConfig(grid=64, face_budget=20_000, density_threshold=0.5,
                                             fill_views=fill_views), "m", 64)
        return trimesh.Trimesh(mesh.positions, mesh.triangles), np.linalg.norm(mesh.positions, axis=1)

    skin, skin_radii = extracted(shell(1.0), 0)
    solid, radii = extracted(shell(1.0), 32)
    bowl, bowl_radii = extracted(shell(0.0), 32)
    assert radii.min() > 0.5 and len(solid.split(only_watertight=False)) == 1 and solid.is_watertight
    assert solid.volume == pytest.approx(4 / 3 * math.pi * radii.mean() ** 3, rel=0.03)
    assert skin_radii.min() < 0.48 and skin.area > 1.4 * solid.area               # outer and inner wall
    axis = (np.arange(48) + 0.5) / 48 * 2 - 1
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    core = np.sqrt(x ** 2 + y ** 2 + z ** 2) < 0.4
    assert hidden(shell(1.0), 48, 32, 64)[core].all()
    assert not hidden(shell(0.0), 48, 32, 64)[core & (z < 0)].any()
    assert bowl_radii.min() < 0.48 and bowl.volume < 0.7 * solid.volume / 2   # a bowl, not a half ball


def test_extracted_surface_sits_where_the_renders_silhouette_is() -> None:
    """The mesh must be the shape the renders show: a ball's skin of Gaussians renders a disc
    whose edge (alpha ½) is out in the Gaussians' tails; the default level puts the mesh there,
    where DreamGaussian's 1.0 shrinks it by several grid cells."""
    skin = shell(1.0)
    cams = orbit_sphere(np.zeros(3), 1.0, *sphere_directions(4), "z", device="cpu")
    with torch.no_grad():
        disc = (splat.render(skin, cams, 64, 1.0).alphas[:, 0] > 0.5).float().sum((1, 2)).mean().item()
    distance = float(np.linalg.norm(cams.view_opencv()[0, :3, 3].numpy()))
    silhouette = distance * math.sin(math.atan(math.sqrt(disc / math.pi) / float(cams.intrinsics(64)[0, 0, 0])))

    def radius(level: float, cfg: MeshConfig = MeshConfig()) -> float:
        mesh, _ = extract(skin, replace(cfg, face_budget=20_000, density_threshold=level), "m", 64)
        return float(np.linalg.norm(mesh.positions, axis=1).mean())

    assert radius(MeshConfig().density_threshold) == pytest.approx(silhouette, abs=0.01)
    assert radius(1.0) < silhouette - 0.025
    # SIR's preset (a cell's filter, three quarters along each Gaussian's smallest axis, each one's
    # thickness, level 0.5, smoothing) puts the mesh within a grid cell (0.016) of the silhouette: these round
    # Gaussians (σ 0.02) are widened by their whole thickness, so it lands just outside (0.559 against 0.553).
    sir = GENERATE_PRESETS["sir"]["quality"].mesh
    assert radius(sir.density_threshold, sir) == pytest.approx(silhouette, abs=2 / sir.grid)
    assert radius(sir.density_threshold, sir) > radius(1.0) + 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat's kernels need CUDA")
def test_gsplat_and_the_torch_path_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    params = splat.sphere(500, 0.5, torch.Generator().manual_seed(0), "cuda")
    cams = orbit_sphere(np.zeros(3), FRAME_RADIUS, [0.0, 120.0, 240.0], [20.0, -20.0, 60.0], "z", device="cuda")
    fast, fast_depth = splat.render(params, cams, 64, 1.0).images, splat.render_depth(params, cams, 64)
    monkeypatch.setenv("KILN_SPLAT", "torch")
    reference, depth = splat.render(params, cams, 64, 1.0).images, splat.render_depth(params, cams, 64)
    assert (fast - reference).abs().mean() < 2e-3
    covered = depth[1] > 0.5
    assert (fast_depth[1] - depth[1]).abs().mean() < 2e-3
    assert (fast_depth[0][covered] - depth[0][covered]).abs().mean() < 1e-2


def crate_prior(resolution: int = 32) -> tuple[ExactPrior, Reference]:
    import trimesh

    from backend.mesh import Mesh
    from backend.unwrap import unwrap

    box = trimesh.creation.box(extents=(1.0, 0.8, 0.6))
    mesh = Mesh(np.asarray(box.vertices, np.float32) * 0.9, np.asarray(box.faces, np.int64), None, name="crate")
    unwrap(mesh)
    v, u = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    texture = torch.stack([u, v, 1 - u]).clamp(0, 1)
    ref = Reference("a crate", mesh, texture)
    other = Reference("a ball", mesh, torch.full((3, 64, 64), 0.2))
    return ExactPrior([ref, other], resolution=resolution), ref


def test_sir_on_gaussians_moves_renders_toward_the_reference() -> None:
    """With the exact prior, SIR's targets are the reference's views; 45 updates must raise
    held-out PSNR clearly above the starting ball's."""
    prior, ref = crate_prior()
    cfg = replace(GENERATE_PRESETS["sir"]["pipeline-check"],
                  schedule=SIRConfig(views=4, iterations=1, ddim_steps=4, t_start=0.5, recon_steps=15,
                                     init_recon_steps=30, init_views=0))
    cams = orbit_sphere(np.zeros(3), FRAME_RADIUS, [30.0, 150.0, 270.0], [15.0, -10.0, 40.0], "z")
    target = prior.decode(prior.renders(Views(cams))[0])

    def psnr(params) -> float:
        with torch.no_grad():
            mse = (splat.render(params, cams, 32, 1.0).images - target).square().mean()
        return float(-10 * torch.log10(mse))

    optimiser = SplatOptimiser(prior, cfg, Prompts(prior, "a crate", ""), 0, TextureEvents(), 100)
    before = psnr(optimiser.params)
    after = psnr(optimiser.run())
    assert after > before + 2, (before, after)


def test_sir_replay_fits_views_from_earlier_passes_without_more_denoising(monkeypatch) -> None:
    """With ``replay`` the reconstruction steps draw their K views from the latest passes'
    targets, so the Gaussians see more cameras for the same images denoised."""
    from backend.sir import passes

    prior, _ = crate_prior()
    seen: dict[int, list[set[float]]] = {}
    counts: dict[int, int] = {}
    for replay in (1, 3):
        cfg = replace(GENERATE_PRESETS["sir"]["pipeline-check"],
                      schedule=SIRConfig(views=2, iterations=3, ddim_steps=4, t_start=0.6, t_end=0.3, recon_steps=4,
                                         init_recon_steps=4, init_views=0, replay=replay))
        optimiser = SplatOptimiser(prior, cfg, Prompts(prior, "a crate", ""), 0, TextureEvents(), 100)
        rendered: list[set[float]] = []
        render = optimiser.render
        monkeypatch.setattr(optimiser, "render", lambda views: rendered.append(set(views.cameras.azimuths))
                            or render(views))
        images = [0]

        def counted(x_t, *args, **kwargs):
            images[0] += len(x_t)
            return ExactPrior.predict_eps(prior, x_t, *args, **kwargs)
        monkeypatch.setattr(prior, "predict_eps", counted)
        optimiser.run()
        seen[replay], counts[replay] = rendered, images[0]
    # each pass renders once to denoise, then once per update; the last pass's updates are the last 4
    per_pass = [4 + 1] * len(passes(cfg.schedule, 1000))
    assert sum(per_pass) == len(seen[1]) == len(seen[3])
    last_1, last_3 = seen[1][-4:], seen[3][-4:]
    assert all(views == last_1[0] for views in last_1)  # the paper's: one frozen set of cameras per pass
    assert len(set().union(*last_3)) > 2  # replay: cameras of earlier passes come back
    assert counts[1] == counts[3]  # at no extra denoising


def column_asset():
    """A tall blue column, fitted into the object's frame: a reference unlike the prior's crate."""
    import trimesh

    from backend.assets import Asset
    from backend.mesh import Mesh
    from backend.reference import frame_box

    column = trimesh.creation.cylinder(0.2, 1.0)
    faces = np.asarray(column.faces, np.int64)
    asset = Asset(Mesh(np.asarray(column.vertices, np.float32), faces, None, up_axis="z"),
                  corner_colours=np.broadcast_to(np.float32([0.1, 0.2, 0.9]), (len(faces), 3, 3)).copy())
    return asset.placed(frame_box(0.8), "z")


def test_gaussians_start_on_the_reference_and_warm_up_toward_it() -> None:
    """With a reference, the Gaussians start on its surface in its colours (the first renders
    already show the column); warmed up toward it for every update, they end nearer its views
    than the same start without the warm-up, which the crate-only prior pulls away."""
    from backend.presets import WarmUp
    from backend.reference import ReferenceViews

    prior, _ = crate_prior()
    asset = column_asset()
    cams = orbit_sphere(np.zeros(3), FRAME_RADIUS, [30.0, 150.0, 270.0], [15.0, -10.0, 40.0], "z")
    column_views, _ = asset.render(cams, 32, 1.0)

    def error(weight: float | None, run: bool = True) -> float:
        schedule = SIRConfig(views=4, iterations=1, ddim_steps=4, t_start=0.5, recon_steps=20, init_recon_steps=40,
                             init_views=0, warmup=WarmUp(weight=weight or 0.0, fraction=1.0))
        base = GENERATE_PRESETS["sir"]["pipeline-check"]
        cfg = replace(base, schedule=schedule, splats=replace(base.splats, count=500))
        reference = None if weight is None else ReferenceViews(asset, schedule.warmup, 32, 1.0)
        optimiser = SplatOptimiser(prior, cfg, Prompts(prior, "a crate", ""), 0, TextureEvents(), 100,
                                   reference=reference)
        params = optimiser.run() if run else optimiser.params
        with torch.no_grad():
            return float((splat.render(params, cams, 32, 1.0).images - column_views).square().mean())

    assert error(0.0, run=False) < 0.7 * error(None, run=False)
    assert error(5.0) < 0.5 * error(0.0)


class Recorder(TextureEvents):
    def __init__(self) -> None:
        self.log_: list[str] = []
        self.order: list[str] = []
        self.progress_: list[tuple[int, int]] = []
        self.mesh = None

    def progress(self, done: int, total: int, phase: str) -> None:
        self.progress_.append((done, total))

    def points(self, positions, colors, sizes) -> None:
        assert positions.shape == colors.shape and colors.dtype == np.uint8 and sizes.shape == (len(positions),)
        self.order.append("points")

    def generated(self, mesh) -> None:
        self.mesh = mesh
        self.order.append("object")

    def texture(self, rgba, final: bool) -> None:
        self.order.append("final" if final else "texture")
        self.final = rgba

    def log(self, text: str) -> None:
        self.log_.append(text)


def test_tiny_generation_runs_end_to_end_on_the_cpu() -> None:
    prior = load_prior("tiny", torch.device("cpu"))
    cfg = GENERATE_PRESETS["sir"]["pipeline-check"]
    rec = Recorder()
    result = generate_object(prior, cfg, "a red chair", "", 3, rec, name="chair")
    # Previews first, then the object, then its textures with exactly one final, last.
    assert rec.order[0] == "points" and rec.order.count("object") == 1
    assert rec.order.index("object") < rec.order.index("texture") and rec.order[-1] == "final"
    assert rec.order.count("final") == 1
    done = [d for d, _ in rec.progress_]
    assert done == sorted(done) and rec.progress_[-1] == (cfg.total_work(), cfg.total_work())
    mesh = result.mesh
    assert mesh.corner_uvs.shape == (mesh.triangle_count, 3, 2) and mesh.up_axis == "z"
    assert 0 < mesh.triangle_count <= cfg.mesh.face_budget
    assert np.abs(mesh.positions).max() <= 1.0
    import trimesh

    tm = trimesh.Trimesh(mesh.positions, mesh.triangles)
    boundary = np.unique(tm.edges_sorted, axis=0, return_counts=True)[1]
    assert (boundary == 1).mean() < 0.02  # closed up to decimation's rare slivers
    assert len(result.splats["means"]) != cfg.splats.count  # densify and prune ran
    assert result.texture.shape == (3, cfg.mesh.texture_size, cfg.mesh.texture_size)
    assert set(result.seconds) == {"gaussians", "extract", "unwrap", "bake", "refine"}


def test_generation_is_deterministic_for_a_seed() -> None:
    """Including gsplat's splits, which draw from torch's global generator (densify every 2 here)."""
    prior = load_prior("tiny", torch.device("cpu"))
    cfg = GENERATE_PRESETS["sds"]["pipeline-check"]
    cfg = replace(cfg, schedule=replace(cfg.schedule, iterations=8),
                  splats=replace(cfg.splats, densify_every=2, grow_grad2d=1e-9))
    runs = []
    for _ in range(2):
        optimiser = SplatOptimiser(prior, cfg, Prompts(prior, "a cup", ""), 7, TextureEvents(), 5)
        runs.append(optimiser.run()["means"].detach().clone())
        torch.manual_seed(len(runs))  # whatever the caller's global state, the result is the same
    assert len(runs[0]) > cfg.splats.count and torch.equal(runs[0], runs[1])


def test_server_streams_previews_then_the_object_then_its_texture(server: BackendServer) -> None:
    sock = server.connect()
    protocol.send(sock, protocol.SUBMIT, {"task": protocol.TASK_GENERATE, "prompt": "a red chair", "model": "tiny",
                                          "texture_size": 512, "seed": 1, "steps": 1})
    msgs = read_until(sock, protocol.DONE, protocol.ERROR)
    assert msgs[-1].type == protocol.DONE and msgs[-1].get("status") == "finished", msgs[-1]
    types = [m.type for m in msgs]
    assert protocol.POINTS in types and types.index(protocol.POINTS) < types.index(protocol.OBJECT) \
        < types.index(protocol.TEXTURE)
    obj = msgs[types.index(protocol.OBJECT)]
    tris = np.frombuffer(obj.arrays["triangles"].data, "<i4").reshape(-1, 3)
    positions = np.frombuffer(obj.arrays["positions"].data, "<f4").reshape(-1, 3)
    uvs = np.frombuffer(obj.arrays["corner_uvs"].data, "<f4").reshape(-1, 2)
    assert tris.max() < len(positions) and len(uvs) == 3 * len(tris) and obj.get("up_axis") == "z"
    textures = [m for m in msgs if m.type == protocol.TEXTURE]
    assert textures[-1].get("final") and sum(m.get("final") for m in textures) == 1


def test_server_refuses_a_controlnet_for_generation(server: BackendServer) -> None:
    sock = server.connect()
    protocol.send(sock, protocol.SUBMIT, {"task": protocol.TASK_GENERATE, "prompt": "a chair", "model": "tiny",
                                          "controlnet": "some/controlnet"})
    error = read_until(sock, protocol.ERROR, protocol.DONE)[-1]
    assert error.type == protocol.ERROR and "no depth ControlNet" in error.get("message")


def test_cli_generates_a_y_up_glb_and_fails_loudly(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "backend", "generate", "--prompt", "a small stool", "--size", "512",
                           "--steps", "1", "--seed", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PIPELINE CHECK" in done.stdout
    summary = json.loads((out / "result.json").read_text())
    import trimesh

    scene = trimesh.load(summary["mesh"])
    glb = next(iter(scene.geometry.values())) if hasattr(scene, "geometry") else scene
    assert len(glb.faces) == summary["triangles"] and glb.visual.uv is not None
    corners = np.asarray(glb.vertex_normals)[np.asarray(glb.faces)]  # shaded smooth, as Blender makes it
    assert np.median(np.degrees(np.arccos(np.clip((corners * glb.face_normals[:, None]).sum(-1), -1, 1)))) > 1
    assert Path(summary["texture"]).is_file() and summary["pipeline_check"]
    from backend import cli

    assert cli.main(["generate", "--prompt", " ", "--out", str(out)]) == 2
    assert "prompt is empty: type what the object should be" in capsys.readouterr().err


PLUGIN_MODULE = '''
"""A prior written outside Kiln: camera-conditioned (the exact prior of a crate), as a multi-view
model would be; Kiln loads it by name."""
import sys

sys.path.insert(0, {tests!r})
from test_generate import crate_prior


def make(device, offline):
    return crate_prior()[0]


def broken(device, offline):
    return object()
'''


def test_a_prior_written_outside_kiln_plugs_in_by_name(tmp_path, monkeypatch) -> None:
    """``python:MODULE:FUNCTION`` loads a prior from outside the project; a camera-conditioned one
    (no view-dependent prompts) drives generation through the same methods. Bad names say what
    is wrong."""
    from backend.jobs import JobRequest, ModelCache, run_generate_job
    from backend.prior import ModelError, load_prior

    (tmp_path / "kiln_plugin_prior.py").write_text(PLUGIN_MODULE.format(tests=str(ROOT / "tests")))
    monkeypatch.syspath_prepend(str(tmp_path))
    prior = load_prior("python:kiln_plugin_prior:make", torch.device("cpu"))
    assert isinstance(prior, ExactPrior) and not prior.wants_view_prompts
    request = JobRequest.from_fields({"task": "generate", "prompt": "a crate", "model": "python:kiln_plugin_prior:make",
                                      "preset": "pipeline-check", "texture_size": 512, "steps": 1})
    result = run_generate_job(request, TextureEvents(), ModelCache())
    assert result.mesh.triangle_count > 100 and result.texture.shape == (3, 512, 512)
    for spec, fragment in (("python:kiln_plugin_prior", "is not MODULE:FUNCTION"),
                           ("python:no_such_module:make", "cannot load plug-in prior"),
                           ("python:kiln_plugin_prior:broken", "without name, device")):
        with pytest.raises(ModelError, match=fragment):
            load_prior(spec, torch.device("cpu"))
