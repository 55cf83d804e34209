"""Kiln's backend: the torch side (server, priors, rasterisers, SIR). Nothing here imports bpy.

This package is imported by Blender too (for ``protocol``), so it must not import torch at load
time: heavy modules are imported where they are used.
"""

__version__ = "0.1.0"
