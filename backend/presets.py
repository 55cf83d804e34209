"""Every schedule and hyperparameter of SIR texturing, in one place, as named presets.

Callers pick a preset by name and override single fields (the panel's Steps and Guidance map to
``iterations`` and ``guidance``); nothing else in the project hard-codes a schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class SIRConfig:
    views: int = 8                  # K cameras per iteration, azimuths evenly spaced
    elevations: tuple[float, ...] = (20.0, -10.0, 45.0)  # cycled over the K views
    iterations: int = 12            # SIR iterations after the initial sample-from-noise pass
    ddim_steps: int = 10            # DDIM grid over [0, T); an iteration walks the part below t2
    t_start: float = 0.6            # t2 / T at the first iteration, annealed linearly ...
    t_end: float = 0.18             # ... to this at the last
    t1_ratio: float = 0.6           # hybrid forward process: noise to t1 = ratio·t2, DDIM-invert to t2
    eta: float = 0.0                # DDIM noise
    guidance: float = 7.5           # classifier-free guidance scale
    recon_steps: int = 15           # N texture updates per iteration, target frozen
    init_recon_steps: int = 40      # texture updates after the initial pass from pure noise
    lr: float = 0.05                # Adam on the texture pyramid's logits
    loss: str = "l2"                # "l2" or "l1" in pixel space
    background: float = 1.0         # grey level behind the mesh in the views the prior sees
    pad_texels: int = 8             # UV-island padding of the final texture
    stream_every: int = 5           # send a texture update every this many texture updates

    def total_work(self) -> int:
        """Progress units: one per texture update, so the bar moves evenly."""
        return self.init_recon_steps + self.iterations * self.recon_steps


PRESETS: dict[str, SIRConfig] = {
    # MicroDreamer's mesh-texture refinement settings scaled to texturing from blank: 8 views,
    # 10-step DDIM, annealed t2, hybrid forward process, 15 updates per iteration. Views render at
    # the prior's own resolution.
    "quality": SIRConfig(),
    # For the built-in tiny model on a CPU: the same algorithm at toy sizes, in seconds.
    "pipeline-check": SIRConfig(views=4, iterations=6, recon_steps=10, init_recon_steps=20, stream_every=5),
}


def default_preset(model: str) -> str:
    return "pipeline-check" if model == "tiny" else "quality"


def resolve(preset: str, overrides: dict[str, Any]) -> SIRConfig:
    """A preset with overrides applied; unknown names fail loudly rather than being ignored."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in fields(SIRConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown SIR setting(s) {sorted(unknown)}; known: {sorted(known)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
