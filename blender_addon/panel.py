"""The Kiln tab in the 3D viewport's sidebar."""

from __future__ import annotations

import textwrap

import bpy

from . import fixes, operators, properties, scene_io, session


class KILN_PT_main(bpy.types.Panel):
    bl_label = "Kiln"
    bl_idname = "KILN_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Kiln"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.kiln
        running = operators._running()
        col = layout.column()
        col.enabled = not running
        col.prop(settings, "prompt")
        col.prop(settings, "negative_prompt")
        col.prop(settings, "model")
        col.prop(settings, "lora")
        col.prop(settings, "vae")
        col.prop(settings, "controlnet")
        col.prop(settings, "method", expand=True)
        row = col.row(align=True)
        row.prop(settings, "refine")
        sub = row.row(align=True)
        sub.active = settings.refine
        sub.prop(settings, "strength", slider=True)
        sub = col.row()
        sub.active = settings.refine
        sub.prop(settings, "selected_faces")
        if settings.refine and settings.selected_faces and context.mode == "EDIT_MESH":
            # Edit Mode keeps the count up to date as faces are picked (elsewhere it reads 0).
            count = sum(o.data.total_face_sel for o in context.objects_in_mode if o.type == "MESH")
            col.label(text=f"{count} face{'' if count == 1 else 's'} to repaint" if count else
                      "No faces selected to repaint", icon="FACESEL" if count else "ERROR")
        if settings.model.strip() == "tiny":
            col.label(text="Tiny model: a pipeline check, not art", icon="INFO")
        row = col.row(align=True)
        row.prop(settings, "seed")
        row.prop(settings, "texture_size", text="Size")
        row = col.row(align=True)
        row.prop(settings, "steps")
        row.prop(settings, "guidance")
        draw_references(col, settings)
        if running:
            fraction, text = operators.ACTIVE.progress()
            if hasattr(layout, "progress"):
                layout.progress(factor=fraction, type="BAR", text=text)
            else:
                layout.label(text=f"{fraction:.0%} {text}")
            layout.operator("kiln.cancel", icon="CANCEL")
        else:
            row = layout.row(align=True)
            row.operator("kiln.texture_selected", icon="TEXTURE")
            row.operator("kiln.generate_object", icon="MESH_MONKEY")
        if operators.hides_textures(context.space_data):
            layout.operator("kiln.show_textures", icon="SHADING_TEXTURE")
        if not running and context.active_object is not None and scene_io.PREVIOUS_MATERIALS in context.active_object:
            layout.operator("kiln.restore_materials", icon="LOOP_BACK")
        if not running:
            if operators.REFUSAL is not None:
                draw_refusal(layout, operators.REFUSAL)
            elif operators.ACTIVE is not None:
                layout.label(text=operators.ACTIVE.summary()[:120],
                             icon="CHECKMARK" if operators.ACTIVE.succeeded else "ERROR")
        for target in operators.ACTIVE.targets if operators.ACTIVE is not None else ():
            if target.reference:
                row = layout.row()
                if target.reference_icon:
                    row.template_icon(icon_value=target.reference_icon, scale=3.0)
                row.label(text=f"Reference: {target.reference}", icon="ASSET_MANAGER")
        box = layout.box()
        box.label(text=f"Backend: {session.MANAGER.status()}", icon="CONSOLE")
        row = box.row(align=True)
        row.operator("kiln.start_backend", text="Start")
        row.operator("kiln.stop_backend", text="Stop")
        row = box.row(align=True)
        row.operator("kiln.unload_models", icon="TRASH")
        row.operator("kiln.copy_diagnostics", icon="COPYDOWN")
        prefs = properties.preferences(context)
        if prefs.backend_mode == "START" and not properties.backend_found(prefs):  # the first job would fail
            box.label(text="No backend environment yet", icon="ERROR")
            properties.draw_setup(box, found=False)


def draw_refusal(layout: bpy.types.UILayout, refusal: scene_io.SceneError) -> None:
    """Why the last press started nothing, wrapped (labels do not wrap), and its fix-it button."""
    box = layout.box()
    for i, line in enumerate(textwrap.wrap(str(refusal), 52)):
        box.label(text=line, icon="ERROR" if i == 0 else "BLANK1")
    if refusal.fix:
        button = box.operator("kiln.fix", text=fixes.FIXES[refusal.fix][0], icon="TOOL_SETTINGS")
        button.action, button.object = refusal.fix, refusal.obj


def draw_references(layout: bpy.types.UILayout, settings: bpy.types.PropertyGroup) -> None:
    """Use References and where they come from: the artist's object, or assets found in the
    libraries, each with its thumbnail and a tick box (unticked ones are not used)."""
    box = layout.box()
    row = box.row(align=True)
    row.prop(settings, "use_references")
    row.operator("kiln.index_libraries", text="", icon="FILE_REFRESH")
    if not settings.use_references:
        return
    box.row().prop(settings, "reference_source", expand=True)
    if settings.reference_source == "OBJECT":
        box.prop(settings, "reference_object", text="")
    else:
        row = box.row(align=True)
        row.operator("kiln.find_references", icon="VIEWZOOM")
        row.operator("kiln.clear_references", text="", icon="X")
        if not len(settings.hits):
            box.label(text="None found yet: jobs take the assets nearest the prompt", icon="INFO")
        for hit in settings.hits:
            row = box.row()
            row.prop(hit, "use", text="")
            icon = scene_io.ReferenceIcon.get(hit.file)
            if icon:
                row.template_icon(icon_value=icon, scale=2.0)
            row.label(text=f"{hit.caption} ({hit.score:.2f})")
    row = box.row(align=True)
    row.prop(settings, "adapt_prior")
    if settings.method != "sir":
        row.prop(settings, "delta_denoising")


CLASSES = (KILN_PT_main,)
