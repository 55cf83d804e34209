"""The Kiln tab in the 3D viewport's sidebar."""

from __future__ import annotations

import textwrap

import bpy

from . import fixes, operators, properties, scene_io, session


class _KilnPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Kiln"


class KILN_PT_main(_KilnPanel, bpy.types.Panel):
    """What every job needs, the buttons and the job's outcome; what most jobs leave as it is
    lives in the collapsed panels below, so the tab stays short."""

    bl_label = "Kiln"
    bl_idname = "KILN_PT_main"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.kiln
        running = operators._running()
        col = settings_column(layout)
        col.prop(settings, "prompt")
        col.prop(settings, "model")
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
                draw_refusal(layout, context, operators.REFUSAL)
            elif operators.ACTIVE is not None:
                draw_wrapped(layout.box(), context, operators.ACTIVE.summary(),
                             "CHECKMARK" if operators.ACTIVE.succeeded else "ERROR")
        for target in operators.ACTIVE.targets if operators.ACTIVE is not None else ():
            if target.reference:
                row = layout.row()
                if target.reference_icon:
                    row.template_icon(icon_value=target.reference_icon, scale=3.0)
                row.label(text=f"Reference: {target.reference}", icon="ASSET_MANAGER")
        prefs = properties.preferences(context)
        if prefs.backend_mode == "START" and not properties.backend_found(prefs):  # the first job would fail
            box = layout.box()
            box.label(text="No backend environment yet", icon="ERROR")
            properties.draw_setup(box, found=False)


class _KilnSubPanel(_KilnPanel):
    """Under the main panel, closed at first: what most jobs leave as it is."""

    bl_parent_id = "KILN_PT_main"
    bl_options = {"DEFAULT_CLOSED"}


def settings_column(layout: bpy.types.UILayout) -> bpy.types.UILayout:
    """A column greyed out while a job runs: a change then would reach only the next job."""
    col = layout.column()
    col.enabled = not operators._running()
    return col


class KILN_PT_advanced(_KilnSubPanel, bpy.types.Panel):
    """The model's add-ons and the method's knobs: each has a default that suits most jobs."""

    bl_label = "Advanced"
    bl_idname = "KILN_PT_advanced"

    def draw(self, context: bpy.types.Context) -> None:
        settings = context.scene.kiln
        col = settings_column(self.layout)
        col.prop(settings, "negative_prompt")
        row = col.row(align=True)
        row.prop(settings, "steps")
        row.prop(settings, "guidance")
        col.prop(settings, "lora")
        if settings.lora.strip():  # under it: beside a path field, both would be cut short in the sidebar
            col.prop(settings, "lora_weight", slider=True)
        col.prop(settings, "vae")
        col.prop(settings, "controlnet")
        if settings.controlnet.strip():
            col.prop(settings, "controlnet_weight", slider=True)


class KILN_PT_references(_KilnSubPanel, bpy.types.Panel):
    """ReDream's references, switched on in the header so the panel can stay closed."""

    bl_label = "References"
    bl_idname = "KILN_PT_references"

    def draw_header(self, context: bpy.types.Context) -> None:
        self.layout.enabled = not operators._running()
        self.layout.prop(context.scene.kiln, "use_references", text="")

    def draw(self, context: bpy.types.Context) -> None:
        draw_references(settings_column(self.layout), context.scene.kiln)


class KILN_PT_backend(_KilnSubPanel, bpy.types.Panel):
    """Open at first: its line says whether jobs run on a GPU or the CPU."""

    bl_label = "Backend"
    bl_idname = "KILN_PT_backend"
    bl_options: set[str] = set()

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.label(text=session.MANAGER.status(), icon="CONSOLE")
        if problem := session.MANAGER.gpu_problem():  # before a job's note says it: slow jobs need a reason
            draw_wrapped(layout, context, problem, "ERROR")
        row = layout.row(align=True)
        row.operator("kiln.start_backend", text="Start")
        row.operator("kiln.stop_backend", text="Stop")
        row = layout.row(align=True)
        row.operator("kiln.unload_models", icon="TRASH")
        row.operator("kiln.copy_diagnostics", icon="COPYDOWN")


def draw_wrapped(layout: bpy.types.UILayout, context: bpy.types.Context, text: str, icon: str) -> None:
    """``text`` on as many labels as the sidebar's width needs (labels do not wrap)."""
    region = getattr(context, "region", None)
    width = int(region.width / (7 * context.preferences.system.ui_scale)) if region is not None else 52
    for i, line in enumerate(textwrap.wrap(text, max(width, 24))):
        layout.label(text=line, icon=icon if i == 0 else "BLANK1")


def draw_refusal(layout: bpy.types.UILayout, context: bpy.types.Context, refusal: scene_io.SceneError) -> None:
    """Why the last press started nothing, and its fix-it button."""
    box = layout.box()
    draw_wrapped(box, context, str(refusal), "ERROR")
    if refusal.fix:
        button = box.operator("kiln.fix", text=fixes.FIXES[refusal.fix][0], icon="TOOL_SETTINGS")
        button.action, button.object = refusal.fix, refusal.obj


def draw_references(layout: bpy.types.UILayout, settings: bpy.types.PropertyGroup) -> None:
    """Where references come from: the artist's object, or assets found in the libraries, each
    with its thumbnail and a tick box (unticked ones are not used). Greyed out, not hidden, while
    Use References is off, so picks can be made before turning it on."""
    box = layout
    box.active = settings.use_references
    box.row().prop(settings, "reference_source", expand=True)
    if settings.reference_source == "OBJECT":
        box.prop(settings, "reference_object", text="")
    else:
        row = box.row(align=True)
        row.operator("kiln.find_references", icon="VIEWZOOM")
        row.operator("kiln.index_libraries", text="", icon="FILE_REFRESH")
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


CLASSES = (KILN_PT_main, KILN_PT_advanced, KILN_PT_references, KILN_PT_backend)
