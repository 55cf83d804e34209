"""Fix-it buttons: when Kiln refuses a job for a reason it can mend itself, the panel shows the
refusal with one button that mends it (``KILN_OT_fix``), as one undo step. Main thread only."""

from __future__ import annotations

from typing import Any, Callable

import bpy
import numpy as np

from . import operators
from .backend import protocol


def _find(context: bpy.types.Context, name_full: str) -> Any:
    return next((o for o in context.view_layer.objects if o.name_full == name_full), None)


class _Selection:
    """Selects only ``obj`` and makes it active for an operator that works on the selection, then
    puts the artist's selection and active object back."""

    def __init__(self, context: bpy.types.Context, obj: Any) -> None:
        self.context, self.obj = context, obj

    def __enter__(self) -> Any:
        layer = self.context.view_layer
        self.selected, self.active = list(self.context.selected_objects), layer.objects.active
        for other in self.selected:
            other.select_set(False)
        self.obj.select_set(True)
        layer.objects.active = self.obj
        return self.obj

    def __exit__(self, *exc: object) -> None:
        layer = self.context.view_layer
        for other in self.selected:
            if other.name in layer.objects:
                other.select_set(True)
        if self.active is not None and self.active.name in layer.objects:
            layer.objects.active = self.active


def _object_mode(context: bpy.types.Context, obj: Any) -> Any:
    with _Selection(context, obj):
        bpy.ops.object.mode_set(mode="OBJECT")
    return obj


def _add_uv_map(context: bpy.types.Context, obj: Any) -> Any:
    """Smart UV Project over the whole mesh, leaving the artist's edit-mode selection as it was."""
    mesh = obj.data
    kept = {}
    for items in (mesh.vertices, mesh.edges, mesh.polygons):
        kept[items] = np.empty(len(items), bool)
        items.foreach_get("select", kept[items])
    with _Selection(context, obj):
        bpy.ops.object.mode_set(mode="EDIT")
        bpy.ops.mesh.select_all(action="SELECT")
        bpy.ops.uv.smart_project()
        bpy.ops.object.mode_set(mode="OBJECT")
    for items, select in kept.items():
        items.foreach_set("select", select)
    mesh.update()
    return obj


def _decimate(context: bpy.types.Context, obj: Any) -> Any:
    """A Decimate modifier whose ratio brings the shown triangles a tenth under Kiln's limit; the
    artist can tune or apply it, and the mesh itself is untouched."""
    evaluated = obj.evaluated_get(context.evaluated_depsgraph_get())
    triangles = len(evaluated.data.loop_triangles)
    modifier = obj.modifiers.new("Kiln Decimate", "DECIMATE")
    modifier.ratio = 0.9 * protocol.MAX_TRIANGLES / max(triangles, 1)
    return obj


def _make_local(context: bpy.types.Context, obj: Any) -> Any:
    """Object > Relations > Make Local with its data; the local object may take a new name."""
    before = set(context.view_layer.objects)
    with _Selection(context, obj):
        bpy.ops.object.make_local(type="SELECT_OBDATA")
    made = [o for o in context.view_layer.objects if o not in before and o.library is None]
    local = made[0] if made else obj
    local.select_set(True)
    return local


#: Each fix: the button's label and what it does (returns the mended object).
FIXES: dict[str, tuple[str, Callable[[bpy.types.Context, Any], Any]]] = {
    "object_mode": ("Switch to Object Mode", _object_mode),
    "add_uv_map": ("Add a UV Map (Smart UV Project)", _add_uv_map),
    "decimate": ("Add a Decimate Modifier", _decimate),
    "make_local": ("Make Local", _make_local),
}


class KILN_OT_fix(bpy.types.Operator):
    """Make the fix Kiln suggested for the object it refused"""

    bl_idname = "kiln.fix"
    bl_label = "Fix"
    bl_options = {"REGISTER", "UNDO"}

    action: bpy.props.EnumProperty(items=[(key, label, "") for key, (label, _) in FIXES.items()])
    object: bpy.props.StringProperty(description="The object's full name")

    def execute(self, context: bpy.types.Context) -> set[str]:
        obj = _find(context, self.object)
        if obj is None:
            self.report({"ERROR"}, f"Kiln: {self.object!r} is no longer in the view layer, so there is nothing to fix")
            return {"CANCELLED"}
        label, mend = FIXES[self.action]
        mended = mend(context, obj)
        operators.REFUSAL = None
        self.report({"INFO"}, f"Kiln: {label.lower()} done for {mended.name!r}; press the button again")
        return {"FINISHED"}


CLASSES = (KILN_OT_fix,)
