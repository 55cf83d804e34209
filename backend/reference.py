"""ReDream's use of a reference asset (retrieved from the library, or the artist's selection):
which way it faces, and the warm-up term that pulls the first updates toward its views.

The warm-up is one more target for the method's own loss: where both the mesh being textured
and the asset cover a pixel, the method's render is compared with the asset's render from the
same camera, weighted by ``WarmUp.weight`` during the first ``WarmUp.fraction`` of the updates.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .assets import Asset
from .cameras import Cameras, orbit, view_suffix
from .embed import ClipEmbedder
from .presets import WarmUp
from .prior import COND, Prior, Prompts, Views, view_prompt

#: Yaw candidates when choosing the asset's front: the four ways a modelled object usually faces.
YAWS = (0.0, 90.0, 180.0, 270.0)
#: Facing is judged from these views of each candidate.
FACING_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)
FACING_ELEVATION = 15.0

FacingScore = Callable[[torch.Tensor, Cameras], float]


class ReferenceViews:
    """The placed asset's renders for the method's cameras (the last camera set is cached: SIR
    fits the same cameras for many steps)."""

    def __init__(self, asset: Asset, cfg: WarmUp, resolution: int, background: float) -> None:
        self.asset, self.cfg, self.resolution, self.background = asset, cfg, resolution, background
        self._key: bytes | None = None
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None

    def active(self, done: int, total: int) -> bool:
        return self.cfg.weight > 0 and done < self.cfg.fraction * total

    def difference(self, images: torch.Tensor, cams: Cameras, mask: torch.Tensor | None) -> torch.Tensor:
        """render − asset render where ``mask`` and the asset both cover the pixel (a fixed mesh's
        texture), or everywhere, background included, when ``mask`` is None (a generated shape,
        free to take the asset's silhouette). The method reduces it the way it reduces its own
        loss and scales that by ``cfg.weight``."""
        target, covered = self.views(cams)
        return images - target if mask is None else (images - target) * (mask * covered)

    def views(self, cams: Cameras) -> tuple[torch.Tensor, torch.Tensor]:
        """The placed asset's (K, 3, H, W) renders from these cameras and their coverage."""
        key = cams.mvp.detach().cpu().numpy().tobytes()
        if key != self._key:
            with torch.no_grad():
                self._views = self.asset.render(cams, self.resolution, self.background)
            self._key = key
        return self._views


def distill_warmup(diff: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
    """The warm-up in SDS/SSD's units: distill_loss's ½·sum per view, per element of the prior's
    space ``x`` (latents or pixels), so one weight means the same for latent and pixel priors."""
    return weight * 0.5 * diff.square().sum() / len(diff) * x.numel() / diff.numel()


def frame_box(radius: float) -> np.ndarray:
    """Corners of the cube whose bounding sphere has ``radius``: what a generated object's
    reference is fitted to (``Asset.placed``), proportions kept."""
    a = radius / math.sqrt(3.0)
    return np.array([[-a, -a, -a], [a, a, a]], np.float32)


def choose_yaw(asset: Asset, positions: np.ndarray, up_axis: str, score: FacingScore, resolution: int,
               background: float, device: torch.device) -> float:
    """The yaw (of ``YAWS``) that makes the placed asset look most like the prompt from the
    prompt's point of view: its front where the front should be."""
    cams = orbit(positions, list(FACING_AZIMUTHS), [FACING_ELEVATION] * len(FACING_AZIMUTHS), up_axis,
                 device=device)
    best, best_score = 0.0, -float("inf")
    for yaw in YAWS:
        with torch.no_grad():
            images, _ = asset.placed(positions, up_axis, yaw).render(cams, resolution, background)
        value = score(images, cams)
        if value > best_score:
            best, best_score = yaw, value
    return best


def prior_facing(prior: Prior, prompt: str, negative: str, seed: int = 0,
                 timesteps: tuple[int, ...] = (300, 500, 700)) -> FacingScore:
    """How well the prior denoises the views (negative mean squared ε error over a few t, the
    same noise for every candidate): a plausible view with the right view-dependent prompt is
    easier to denoise. Works with any prior, camera-conditioned or text-to-image."""
    prompts = Prompts(prior, prompt, negative)

    def score(images: torch.Tensor, cams: Cameras) -> float:
        generator = torch.Generator(device=prior.device).manual_seed(seed)
        with torch.no_grad():
            x = prior.encode(images.to(prior.device))
            total = 0.0
            for t in timesteps:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                _, eps = prior.predict_eps(prior.schedule.add_noise(x, noise, t), t, prompts.for_views(cams),
                                           Views(cams), COND)
                total -= float((eps.float() - noise.float()).square().mean())
        return total

    return score


def clip_facing(clip: ClipEmbedder, prompt: str) -> FacingScore:
    """Mean CLIP similarity of each view to the prompt with that view's suffix ("…, back view")."""

    def score(images: torch.Tensor, cams: Cameras) -> float:
        texts = [view_prompt(prompt, view_suffix(a, e), clip.tokenizer)
                 for a, e in zip(cams.azimuths, cams.elevations, strict=True)]
        return float((clip.images(images) * clip.text(texts)).sum(1).mean())

    return score

