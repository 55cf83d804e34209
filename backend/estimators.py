"""Score-distillation residuals: SDS (DreamFusion) and SSD (stable score distillation).

Each returns the per-pixel direction that the render should move *against* (the usual
``target = x − w(t)·residual``), from the prior's unconditional and conditional ε-predictions and
the noise ε that was added. Per-sample quantities reduce over every axis but the batch one.
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("sds", "uniform", "snr_sqrt")


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def weight(alpha_bar: float, kind: str = "sds") -> float:
    """w(t): DreamFusion's 1 − ᾱ_t ('sds'), 1 ('uniform'), or sqrt((1 − ᾱ)/ᾱ) ('snr_sqrt')."""
    if kind == "sds":
        return 1.0 - alpha_bar
    if kind == "uniform":
        return 1.0
    if kind == "snr_sqrt":
        return ((1.0 - alpha_bar) / alpha_bar) ** 0.5
    raise ValueError(f"unknown weighting {kind!r}; choose one of {WEIGHTINGS}")


def sds_residual(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, noise: torch.Tensor,
                 guidance: float) -> torch.Tensor:
    """ε_cfg − ε."""
    return cfg(eps_uncond, eps_cond, guidance) - noise


def _per_sample_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def projection_ratio(eps_cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """c = ⟨ε_cond, ε⟩ / ‖ε‖², the least-squares coefficient of ε in ε_cond, per sample, shaped
    to broadcast against the batch."""
    c = _per_sample_dot(eps_cond, noise) / _per_sample_dot(noise, noise).clamp_min(1e-12)
    return c.view(-1, *([1] * (noise.dim() - 1)))


def ssd_residual(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, noise: torch.Tensor,
                 t: torch.Tensor | int, tau: int, guidance: float) -> torch.Tensor:
    """SSD's estimator: the mode-disengaging term ω·h, h = ε_cond − ε_uncond, where t ≥ τ; below τ
    the variance-reduced mode-seeking term ε_cond − c·ε, rescaled to the norm of ω·h (per
    sample), so both branches carry SDS's main signal at the same scale."""
    h = guidance * (eps_cond - eps_uncond)
    seek = eps_cond - projection_ratio(eps_cond, noise) * noise
    scale = _per_sample_dot(h, h).sqrt() / _per_sample_dot(seek, seek).sqrt().clamp_min(1e-12)
    seek = seek * scale.view(-1, *([1] * (noise.dim() - 1)))
    t = torch.as_tensor(t, device=noise.device).expand(noise.shape[0]).view(-1, *([1] * (noise.dim() - 1)))
    return torch.where(t >= tau, h, seek)
