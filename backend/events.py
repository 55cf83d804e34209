"""What a job (texturing or generating) reports while it works; the server and the CLI each implement it.

The defaults do nothing, so a front end overrides only what it shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .mesh import Mesh


class Cancelled(Exception):
    """Raised inside a job when ``TextureEvents.cancelled`` turns True."""


class TextureEvents:
    def progress(self, done: int, total: int, phase: str) -> None:
        """``done`` of ``total`` texture updates; ``phase`` is a short human-readable stage."""

    def texture(self, rgba: torch.Tensor, final: bool) -> None:
        """The current texture as (H, W, 4) uint8, rows bottom-up; exactly one is ``final``."""

    def uvs(self, loop_uvs: np.ndarray | None, corner_uvs: np.ndarray) -> None:
        """New UVs from unwrapping: per Blender loop (None for meshes without loops) and per corner."""

    def tiles(self, tiles: list[list[int]]) -> None:
        """The UV tiles ([u, v] each) the mesh's map spans, which the job textures side by side in
        one image (``protocol.TILES_UV_MAP``); its corner UVs now read them there."""

    def points(self, positions: np.ndarray, colors: np.ndarray, sizes: np.ndarray) -> None:
        """A generation preview: (N, 3) float32 centres, (N, 3) uint8 colours, (N,) float32 radii."""

    def generated(self, mesh: Mesh) -> None:
        """A generated object's final geometry with its UVs; its textures follow as ``texture`` events."""

    def reference(self, file: str, score: float, yaw: float, thumbnails: np.ndarray) -> None:
        """The asset the job warms up toward: its file, retrieval score (1 for one the user chose),
        the yaw that faces it forward, and its (V, S, S, 3) uint8 thumbnails."""

    def hits(self, hits: list[dict[str, object]], thumbnails: np.ndarray) -> None:
        """A library search's nearest assets, best first ("file", "caption", "score" each) and their
        (K, V, S, S, 3) uint8 thumbnails, for the artist to pick references from."""

    def log(self, text: str) -> None:
        """A message the user should see."""

    def loading(self, model: str | None) -> None:
        """The job now waits on ``model``'s load (a first download takes minutes), or no longer
        (None): no step runs meanwhile, so a cancel cannot be seen until it is over."""

    def cancelled(self) -> bool:
        """Polled between steps; True stops the job within a step."""
        return False
