"""Estimators and DDIM against hand-computed values and an analytic Gaussian prior."""

from __future__ import annotations

import pytest
import torch

from backend import diffusion, estimators


def test_sds_residual_and_weightings_by_hand() -> None:
    u, c, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 1.0]]), torch.tensor([[0.5, 0.5]])
    # ε_cfg = u + 3(c − u) = [4, 3]; minus ε = [3.5, 2.5]
    assert torch.equal(estimators.sds_residual(u, c, n, 3.0), torch.tensor([[3.5, 2.5]]))
    assert estimators.weight(0.75, "sds") == 0.25
    assert estimators.weight(0.75, "uniform") == 1.0
    assert estimators.weight(0.8, "snr_sqrt") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown weighting"):
        estimators.weight(0.5, "nope")


def test_ssd_projection_ratio_by_hand() -> None:
    eps_cond = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]])
    noise = torch.tensor([[[1.0, 0.0]], [[2.0, 2.0]]])
    c = estimators.projection_ratio(eps_cond, noise)
    assert c.shape == (2, 1, 1)
    assert torch.allclose(c.flatten(), torch.tensor([3.0, 0.25]))  # ⟨(3,4),(1,0)⟩/1 ; ⟨(1,0),(2,2)⟩/8
    # what is left after removing c·ε is orthogonal to ε
    rest = eps_cond - c * noise
    assert torch.allclose((rest * noise).sum((1, 2)), torch.zeros(2), atol=1e-6)


def test_ssd_switches_at_tau_and_matches_norms() -> None:
    u = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    c = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    n = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = estimators.ssd_residual(u, c, n, torch.tensor([500, 100]), tau=200, guidance=2.0)
    assert torch.allclose(out[0], torch.tensor([6.0, 8.0]))        # t ≥ τ: ω·h
    # t < τ: ε_cond − 3ε = (0, 4), rescaled to ‖ω·h‖ = 10
    assert torch.allclose(out[1], torch.tensor([0.0, 10.0]))


def gaussian_eps(schedule: diffusion.NoiseSchedule, mu: torch.Tensor, var: float):
    """The exact ε-prediction of data ~ N(μ, var·I): E[ε | x_t] = s_t (x_t − a_t μ) / (a_t² var + s_t²)."""
    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        a, s = schedule.coefficients(t)
        return s * (x - a * mu) / (a * a * var + s * s)
    return eps


def round_trip_error(steps: int) -> float:
    schedule = diffusion.NoiseSchedule.stable_diffusion()
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen)
    eps = gaussian_eps(schedule, mu, 0.3)
    t1, t2 = schedule.snap(300, steps), schedule.snap(700, steps)
    x0 = mu + 0.3 ** 0.5 * torch.randn(mu.shape, dtype=torch.float64, generator=gen)
    x_t1 = schedule.add_noise(x0, torch.randn(mu.shape, dtype=torch.float64, generator=gen), t1)
    x_t2 = diffusion.invert(schedule, eps, x_t1, t1, t2, steps)
    assert (x_t2 - x_t1).norm() / x_t1.norm() > 0.1  # it really moved
    back = diffusion.sample(schedule, eps, x_t2, t2, steps, t_end=t1, eta=0.0)
    return float((back - x_t1).norm() / x_t1.norm())


def test_ddim_inversion_then_sampling_returns_the_input() -> None:
    """Inversion is first order: the round trip is close, and closer with finer steps."""
    coarse, fine = round_trip_error(50), round_trip_error(200)
    assert coarse < 1e-2 and fine < coarse / 2


def sample_std(steps: int, eta: float) -> tuple[float, float]:
    schedule = diffusion.NoiseSchedule.stable_diffusion()
    mu = torch.full((20000, 1), 2.0, dtype=torch.float64)
    eps = gaussian_eps(schedule, mu, 0.25)
    gen = torch.Generator().manual_seed(1)
    start = schedule.grid(steps)[-1]
    a, s = schedule.coefficients(start)
    # start from the true marginal at t: SD's schedule is not pure noise even at T − 1
    x_t = a * mu + (a * a * 0.25 + s * s) ** 0.5 * torch.randn(mu.shape, generator=gen, dtype=torch.float64)
    x = diffusion.sample(schedule, eps, x_t, start, steps, eta=eta, generator=gen)
    return x.mean().item(), x.std().item()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sampling_reaches_the_data_distribution(eta: float) -> None:
    """On N(2, 0.5²) data with the exact ε, samples land on the data mean, and their spread
    converges to 0.5 as steps grow (each DDIM step slightly contracts the variance)."""
    mean, coarse = sample_std(20, eta)
    _, fine = sample_std(500, eta)
    assert mean == pytest.approx(2.0, abs=0.02)
    assert abs(fine - 0.5) < 0.02 and abs(fine - 0.5) < abs(coarse - 0.5)


@pytest.mark.parametrize("sampler", ["lcm", "ddim"])
def test_lcm_sampling_renoises_each_clean_estimate_afresh(sampler: str) -> None:
    """On point-mass data (exact ε) both samplers land on the point, but LCM's multistep sampler
    noises each clean estimate to the next grid time with new noise, where DDIM carries the same
    noise direction down the grid."""
    schedule = diffusion.NoiseSchedule.stable_diffusion()
    c = torch.full((20000,), 0.7, dtype=torch.float64)
    seen: list[tuple[torch.Tensor, int]] = []

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append((x.clone(), t))
        a, s = schedule.coefficients(t)
        return (x - a * c) / s

    gen = torch.Generator().manual_seed(0)
    start = schedule.grid(4)[-1]
    x_t = schedule.add_noise(c, torch.randn(c.shape, generator=gen, dtype=torch.float64), start)
    out = diffusion.sample(schedule, eps, x_t, start, 4, generator=gen, sampler=sampler)
    assert torch.allclose(out, c)
    assert [t for _, t in seen] == schedule.grid(4)[::-1]
    noises = [(x - schedule.coefficients(t)[0] * c) / schedule.coefficients(t)[1] for x, t in seen]
    assert all(abs(float(z.std()) - 1) < 0.02 for z in noises)
    corr = [float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for a, b in zip(noises, noises[1:])]
    assert all(abs(r) < 0.03 for r in corr) if sampler == "lcm" else all(r > 0.999 for r in corr)


def test_unknown_sampler_is_refused() -> None:
    schedule = diffusion.NoiseSchedule.stable_diffusion()
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        diffusion.sample(schedule, lambda x, t: x, torch.zeros(2), 999, 4, sampler="euler")
