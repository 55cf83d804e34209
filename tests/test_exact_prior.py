"""The exact prior against brute force, and SIR textured against it (a measurable end-to-end run)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from backend.cameras import orbit
from backend.events import TextureEvents
from backend.exact_prior import ExactPrior, Reference
from backend.mesh import Mesh
from backend.presets import SIRConfig
from backend.prior import Views
from backend.raster import rasterize_views
from backend.sir import SIRTexturer
from backend.texture import render, sample_image
from backend.unwrap import unwrap


def box_mesh() -> Mesh:
    import trimesh

    box = trimesh.creation.box(extents=(1.0, 0.8, 0.6)).subdivide()
    mesh = Mesh(np.asarray(box.vertices, np.float32), np.asarray(box.faces, np.int64), None, up_axis="y")
    unwrap(mesh)
    return mesh


def pattern(size: int, phase: float) -> torch.Tensor:
    """A smooth colourful texture (rows bottom-up) with detail a 64² view can resolve."""
    v, u = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([0.5 + 0.4 * torch.sin(6 * u + phase), 0.5 + 0.4 * torch.cos(5 * v - phase),
                        0.5 + 0.4 * torch.sin(4 * (u + v))])


def test_denoiser_matches_brute_force_softmax() -> None:
    mesh = box_mesh()
    refs = [Reference("a", mesh, pattern(32, 0.0)), Reference("a", mesh, pattern(32, 1.5)),
            Reference("b", mesh, pattern(32, 3.0))]
    prior = ExactPrior(refs, resolution=16)
    views = Views(orbit(mesh.positions, [0.0, 90.0], [10.0, 30.0], "y"))
    renders = prior.renders(views).double()
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    for t in (50, 400, 900):
        a, s = prior.schedule.coefficients(t)
        uncond, cond = prior.predict_eps(x_t.float(), t, prior.encode_prompt("a", ""), views)
        for k in range(2):
            for chosen, eps in ((range(3), uncond), ((0, 1), cond)):
                logits = [-float(((x_t[k] - a * renders[j, k]) ** 2).sum()) / (2 * s * s) for j in chosen]
                top = max(logits)
                w = [math.exp(lg - top) for lg in logits]
                x0 = sum(wi * renders[j, k] for wi, j in zip(w, chosen, strict=True)) / sum(w)
                expected = (x_t[k] - a * x0) / s
                assert torch.allclose(eps[k].double(), expected, atol=1e-4), (t, k)


def test_a_spread_unconditional_is_the_score_of_its_gaussian_mixture() -> None:
    """With uncond_spread σ, ε_uncond is −s_t·∇log Σ_j N(x_t; a_t r_j, (a_t²σ² + s_t²)I), here by
    autograd; the conditional mixture keeps its sharp references."""
    mesh = box_mesh()
    refs = [Reference("a", mesh, pattern(32, 0.0)), Reference("b", mesh, pattern(32, 1.5)),
            Reference("b", mesh, pattern(32, 3.0))]
    sharp = ExactPrior(refs, resolution=16)
    prior = ExactPrior(refs, resolution=16, uncond_spread=0.4)
    views = Views(orbit(mesh.positions, [0.0, 90.0], [10.0, 30.0], "y"))
    renders = prior.renders(views).double()
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (50, 400, 900):
        a, s = prior.schedule.coefficients(t)
        x = x_t.clone().requires_grad_(True)
        var = a * a * 0.4 ** 2 + s * s
        density = torch.logsumexp(-(x[None] - a * renders).square().flatten(2).sum(2) / (2 * var), dim=0).sum()
        (score,) = torch.autograd.grad(density, x)
        uncond, cond = prior.predict_eps(x_t.float(), t, prior.encode_prompt("a", ""), views)
        assert torch.allclose(uncond.double(), -s * score, atol=1e-4), t
        assert torch.equal(cond, sharp.predict_eps(x_t.float(), t, sharp.encode_prompt("a", ""), views)[1])
    with pytest.raises(ValueError, match="uncond_spread must be ≥ 0"):
        ExactPrior(refs, uncond_spread=-0.1)


def test_denoiser_at_low_noise_returns_the_nearest_reference() -> None:
    mesh = box_mesh()
    refs = [Reference("a", mesh, pattern(32, 0.0)), Reference("a", mesh, pattern(32, 2.0))]
    prior = ExactPrior(refs, resolution=16)
    views = Views(orbit(mesh.positions, [30.0], [20.0], "y"))
    renders = prior.renders(views)
    chosen = prior.encode_prompt("a", "")
    a, _ = prior.schedule.coefficients(10)
    near = prior.denoise(a * renders[1] + 0.01 * torch.randn_like(renders[1]), 10, chosen, renders)
    assert torch.allclose(near, renders[1], atol=1e-4)
    with pytest.raises(ValueError, match="knows no prompt"):
        prior.encode_prompt("c", "")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / (a - b).detach().square().mean()))


class BoxScene:
    """A box, its reference texture for 'a box', and held-out cameras to score a texture on. With
    ``second_prompt`` the unconditional mixture also holds 'a crate': without it ε_cond = ε_uncond,
    h = 0, and SSD (scaled to ‖ω·h‖) has nothing to follow."""

    def __init__(self, second_prompt: bool, uncond_spread: float = 0.0) -> None:
        torch.manual_seed(0)
        self.mesh = box_mesh()
        self.reference = pattern(128, 0.7)
        refs = [Reference("a box", self.mesh, self.reference)]
        if second_prompt:
            refs.append(Reference("a crate", self.mesh, pattern(128, 2.5)))
        self.prior = ExactPrior(refs, resolution=64, uncond_spread=uncond_spread)
        held_out = orbit(self.mesh.positions, [17.0, 137.0, 257.0], [35.0, -20.0, 5.0], "y")
        self.raster = rasterize_views(torch.as_tensor(self.mesh.positions), torch.as_tensor(self.mesh.triangles),
                                      held_out.mvp, 64)
        self.uvs = torch.as_tensor(self.mesh.corner_uvs)
        self.truth = render(lambda uv: sample_image(self.reference, uv), self.uvs, self.raster, 1.0)

    def psnr(self, texturer) -> float:
        return psnr(render(texturer.texture.sample, self.uvs, self.raster, 1.0), self.truth)


def test_sir_against_the_exact_prior_reaches_the_reference() -> None:
    """SIR with K=4 views and the hybrid forward process, texturing a box toward one reference:
    PSNR on held-out cameras rises from the blank texture's to well above it."""
    scene = BoxScene(second_prompt=False)
    cfg = SIRConfig(views=4, iterations=8, ddim_steps=10, guidance=1.0, recon_steps=15, init_recon_steps=30,
                    lr=0.05, pad_texels=2)
    texturer = SIRTexturer(scene.mesh, scene.prior, cfg, 128, "a box", "", seed=0, events=TextureEvents())
    before = scene.psnr(texturer)
    texturer.run()
    after = scene.psnr(texturer)
    print(f"SIR vs exact prior: held-out PSNR {before:.1f} dB → {after:.1f} dB")
    assert after > before + 8 and after > 25, (before, after)


@pytest.mark.parametrize("estimator, guidance", [("sds", 20.0), ("ssd", 7.5)])
def test_score_distillation_against_the_exact_prior_raises_psnr(estimator: str, guidance: float) -> None:
    from backend.distill import DistillTexturer
    from backend.presets import DistillConfig

    scene = BoxScene(second_prompt=True)
    cfg = DistillConfig(estimator=estimator, guidance=guidance, iterations=150, views=4, lr=0.03, pad_texels=2)
    texturer = DistillTexturer(scene.mesh, scene.prior, cfg, 128, "a box", "", seed=0, events=TextureEvents())
    before = scene.psnr(texturer)
    texturer.run()
    after = scene.psnr(texturer)
    print(f"{estimator} vs exact prior: held-out PSNR {before:.1f} dB → {after:.1f} dB")
    assert after > before + 3, (before, after)


def test_ssd_converges_once_the_unconditional_is_broader_than_the_prompts() -> None:
    """Near the reference a sharp unconditional agrees with the conditional, h = 0, and SSD (scaled
    to ‖ω·h‖) stalls; a spread unconditional keeps h pointing at the reference."""
    from backend.distill import DistillTexturer
    from backend.presets import DistillConfig

    cfg = DistillConfig(estimator="ssd", guidance=7.5, iterations=150, views=4, lr=0.03, pad_texels=2)
    reached = {}
    for spread in (0.0, 0.4):
        scene = BoxScene(second_prompt=True, uncond_spread=spread)
        texturer = DistillTexturer(scene.mesh, scene.prior, cfg, 128, "a box", "", seed=0, events=TextureEvents())
        texturer.run()
        reached[spread] = scene.psnr(texturer)
    assert reached[0.4] > 32 and reached[0.4] > reached[0.0] + 10, reached


@pytest.mark.parametrize("method", ["sir", "sds"])
def test_refine_starts_from_the_given_texture_and_keeps_a_good_one(method: str) -> None:
    from backend.distill import DistillTexturer
    from backend.presets import PRESETS, DistillConfig

    scene = BoxScene(second_prompt=True)
    if method == "sir":
        cls, cfg = SIRTexturer, PRESETS["sir"]["refine"]
    else:
        cls, cfg = DistillTexturer, DistillConfig(estimator="sds", guidance=7.5, iterations=40, lr=0.01)
    texturer = cls(scene.mesh, scene.prior, cfg, 128, "a box", "", seed=0, events=TextureEvents(),
                   init_texture=scene.reference, strength=0.3)
    assert texturer.total == cfg.total_work(refine=True)
    start = scene.psnr(texturer)
    texturer.run()
    end = scene.psnr(texturer)
    assert start > 40 and end > 30, (start, end)
