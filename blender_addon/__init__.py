"""Kiln: texture meshes from a text prompt, with a local GPU backend.

This side is bpy only (plus Blender's bundled numpy). Torch lives in the backend process, in its
own environment, so no install step ever touches Blender's Python.
"""

from __future__ import annotations

import bpy

from . import fixes, operators, panel, properties, scene_io, session

CLASSES = (*properties.CLASSES, *operators.CLASSES, *fixes.CLASSES, *panel.CLASSES)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    properties.register()
    bpy.app.handlers.load_pre.append(operators.on_file_load)
    bpy.app.handlers.save_pre.append(operators.on_save)


def unregister() -> None:
    if operators.on_file_load in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(operators.on_file_load)
    if operators.on_save in bpy.app.handlers.save_pre:
        bpy.app.handlers.save_pre.remove(operators.on_save)
    operators.stop_running_job("stopped: Kiln was disabled")
    operators.stop_setup()
    session.MANAGER.stop()
    scene_io.ReferenceIcon.free()
    properties.unregister()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
