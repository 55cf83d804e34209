"""The exact prior: the closed-form optimal denoiser of a finite set of reference renders.

With no pretrained weights offline, quality is measured against a prior whose score is known
exactly. For camera π and prompt y the data are the renders r_j(π) of reference textured meshes —
several texture variants per prompt make it multimodal — and

    x̂₀(x_t) = Σ_j softmax_j(−‖x_t − a_t r_j‖² / 2s_t²) · r_j,   ε̂ = (x_t − a_t x̂₀) / s_t,

conditional over the prompt's variants, unconditional over every prompt's, so CFG means
something. It works in pixel space (model space = 2·image − 1) at a small resolution on the CPU.

``uncond_spread`` σ widens the unconditional mixture: each reference becomes a Gaussian
N(r_j, σ²I) there, whose exact denoiser is

    x̂₀ = (s_t²·Σ_j w_j r_j + a_t σ²·x_t) / (a_t²σ² + s_t²),   w = softmax_j(−‖x_t − a_t r_j‖² / 2(a_t²σ² + s_t²)).

Why: with σ = 0 both mixtures are one-hot on the same reference once a render is nearest it (in
the quality bench, below t ≈ 850), so ε_cond = ε_uncond and CFG's direction h vanishes, which
stalls SSD; a real model's unconditional covers far more images than any prompt's, and its h
keeps pointing at the prompt's mode. The price of σ > 0: where a_t·σ > s_t the unconditional takes
noise for data (x̂₀ follows x_t) and CFG amplifies it. The quality bench's ``--ssd-sweep``
measures both sides. σ = 0, the default, is the formula above exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .diffusion import NoiseSchedule
from .mesh import Mesh
from .prior import BOTH, COND, UNCOND, Views
from .raster import rasterize_views
from .texture import render, sample_image


@dataclass
class Reference:
    prompt: str
    mesh: Mesh              # needs corner_uvs
    texture: torch.Tensor   # (3, S, S) in [0, 1], rows bottom-up


class ExactPrior:
    pipeline_check = False
    wants_view_prompts = False  # camera-conditioned already


    def __init__(self, references: list[Reference], resolution: int = 64, background: float = 1.0,
                 schedule: NoiseSchedule | None = None, device: str | torch.device = "cpu",
                 name: str = "exact", uncond_spread: float = 0.0) -> None:
        if uncond_spread < 0:
            raise ValueError(f"uncond_spread must be ≥ 0 (a standard deviation in model space), not {uncond_spread}")
        if not references:
            raise ValueError("the exact prior needs at least one reference")
        self.references = references
        self.resolution = resolution
        self.background = background
        self.schedule = schedule or NoiseSchedule.stable_diffusion()
        self.device = torch.device(device)
        self.name = name
        self.uncond_spread = uncond_spread
        self.prompts = sorted({r.prompt for r in references})
        self._renders: dict[bytes, torch.Tensor] = {}

    def encode_prompt(self, prompt: str, negative: str) -> torch.Tensor:
        """Which references the conditional mixture runs over (a boolean mask); the negative
        prompt has no meaning here and the unconditional mixture covers every reference."""
        chosen = torch.tensor([r.prompt == prompt for r in self.references])
        if not bool(chosen.any()):
            raise ValueError(f"the exact prior knows no prompt {prompt!r}; it knows {self.prompts}")
        return chosen

    def stack_prompts(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        return prompts[0]

    def latent_shape(self, images: torch.Tensor) -> torch.Size:
        return images.shape

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2).clamp(0, 1)

    def renders(self, views: Views) -> torch.Tensor:
        """Every reference rendered at these cameras, (J, K, 3, H, W) in model space; cached,
        since a method asks for the same cameras at every timestep."""
        key = views.cameras.mvp.detach().cpu().numpy().tobytes()
        if key not in self._renders:
            out, rasters = [], {}
            for ref in self.references:
                if id(ref.mesh) not in rasters:  # texture variants share their mesh's raster
                    positions = torch.as_tensor(ref.mesh.positions, device=self.device)
                    rasters[id(ref.mesh)] = rasterize_views(
                        positions, torch.as_tensor(ref.mesh.triangles, device=self.device),
                        views.cameras.mvp.to(self.device), self.resolution)
                raster = rasters[id(ref.mesh)]
                uvs = torch.as_tensor(ref.mesh.corner_uvs, device=self.device)
                texture = ref.texture.to(self.device)
                out.append(self.encode(render(lambda uv, tex=texture: sample_image(tex, uv), uvs, raster,
                                              self.background)))
            self._renders = {key: torch.stack(out)}  # one camera batch at a time bounds memory
        return self._renders[key]

    def denoise(self, x_t: torch.Tensor, t: int, chosen: torch.Tensor, renders: torch.Tensor,
                spread: float = 0.0) -> torch.Tensor:
        """x̂₀ per view over the chosen references, each spread by ``spread`` (module docstring)."""
        a, s = self.schedule.coefficients(t)
        var = a * a * spread * spread + s * s
        refs = renders[chosen]                                             # (J', K, 3, H, W)
        dist = (x_t[None] - a * refs).square().flatten(2).sum(2)           # (J', K)
        weights = torch.softmax(-dist / (2 * var), dim=0)
        mean = (weights[..., None, None, None] * refs).sum(0)
        return (s * s * mean + a * spread * spread * x_t) / var

    def predict_eps(self, x_t: torch.Tensor, t: int, prompt: torch.Tensor, views: Views | None,
                    branches: str = BOTH) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if views is None:
            raise ValueError("the exact prior is camera-conditioned: it needs the views")
        renders = self.renders(views)
        a, s = self.schedule.coefficients(t)
        uncond = cond = None
        if branches in (UNCOND, BOTH):
            uncond = (x_t - a * self.denoise(x_t, t, torch.ones_like(prompt), renders, self.uncond_spread)) / s
        if branches in (COND, BOTH):
            cond = (x_t - a * self.denoise(x_t, t, prompt, renders)) / s
        return uncond, cond
