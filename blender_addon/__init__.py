"""Kiln: texture meshes from a text prompt, with a local GPU backend.

This side is bpy only (plus Blender's bundled numpy). Torch lives in the backend process, in its
own environment, so no install step ever touches Blender's Python.
"""

from __future__ import annotations

import bpy

from . import fixes, operators, panel, properties, scene_io, session

CLASSES = (*properties.CLASSES, *operators.CLASSES, *fixes.CLASSES, *panel.CLASSES)

#: (handler list, function): Blender's file events the add-on follows.
HANDLERS = (("load_pre", operators.on_file_load), ("load_post", operators.on_file_loaded),
            ("save_pre", operators.on_save), ("save_post", operators.on_saved),
            ("save_post_fail", operators.on_saved))


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    properties.register()
    for event, handler in HANDLERS:
        getattr(bpy.app.handlers, event).append(handler)


def unregister() -> None:
    for event, handler in HANDLERS:
        if handler in getattr(bpy.app.handlers, event):
            getattr(bpy.app.handlers, event).remove(handler)
    operators.stop_running_job("stopped: Kiln was disabled")
    operators.stop_setup()
    session.MANAGER.stop()
    scene_io.ReferenceIcon.free()
    properties.unregister()
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
