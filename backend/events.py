"""What a texturing job reports while it works; the server and the CLI each implement it.

The defaults do nothing, so a front end overrides only what it shows.
"""

from __future__ import annotations

import numpy as np
import torch


class Cancelled(Exception):
    """Raised inside a job when ``TextureEvents.cancelled`` turns True."""


class TextureEvents:
    def progress(self, done: int, total: int, phase: str) -> None:
        """``done`` of ``total`` texture updates; ``phase`` is a short human-readable stage."""

    def texture(self, rgba: torch.Tensor, final: bool) -> None:
        """The current texture as (H, W, 4) uint8, rows bottom-up; exactly one is ``final``."""

    def uvs(self, loop_uvs: np.ndarray | None, corner_uvs: np.ndarray) -> None:
        """New UVs from unwrapping: per Blender loop (None for meshes without loops) and per corner."""

    def log(self, text: str) -> None:
        """A message the user should see."""

    def cancelled(self) -> bool:
        """Polled between steps; True stops the job within a step."""
        return False
