"""The sRGB transfer curve, both ways, on numpy arrays: one definition for the backend (the
colours of mesh files) and the add-on (Blender's images and colours), which imports it from its
copy of the backend (numpy only, as Blender bundles numpy and no torch)."""

from __future__ import annotations

import numpy as np


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    """Clamped to [0, 1] first: a factor or a float image may reach past it."""
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)
