"""The artist's settings: per scene (saved with the .blend) and per installation (preferences)."""

from __future__ import annotations

import os

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)

from .backend import protocol
from .backend_process import BackendChoice, BackendError, find_python

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Options of a scene's path field that may be relative to the .blend ("//", resolved by
#: ``typed_path``). Blender 4.5 asks fields to say so, and otherwise warns when one is set and its
#: file browser writes absolute paths; 4.2 to 4.4 know no such option and let every path field hold one.
BLEND_RELATIVE = {"PATH_SUPPORTS_BLEND_RELATIVE"} if bpy.app.version >= (4, 5, 0) else set()


class KilnLibrary(bpy.types.PropertyGroup):
    path: StringProperty(name="Folder", subtype="DIR_PATH",
                         description="A folder of GLB/glTF/OBJ/PLY assets and of .blend files with marked assets "
                                     "(searched with its sub-folders)")


class KilnHit(bpy.types.PropertyGroup):
    """One asset a library search found; ticked ones are the job's references, the first the primary."""

    file: StringProperty(name="File", subtype="FILE_PATH")
    caption: StringProperty(name="Caption")
    score: FloatProperty(name="Score")
    use: BoolProperty(name="Use", default=True, description="Use this asset as a reference")


def _is_mesh(_settings: "KilnSettings", obj: bpy.types.Object) -> bool:
    return obj.type == "MESH"


class KilnPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    backend_mode: EnumProperty(name="Backend", default="START", items=[
        ("START", "Start Its Own", "Blender starts the backend when a job needs it and stops it on quit"),
        ("CONNECT", "Connect to a Running Backend",
         "Use a backend you started yourself with `python -m backend serve --connection-file`: its models stay "
         "loaded across Blender sessions, and its output is in its own terminal")])
    connection_file: StringProperty(
        name="Connection File", subtype="FILE_PATH", default="",
        description="The file the running backend wrote its port and secret to. Empty: "
                    "~/.kiln/backend.json, the backend's default")
    python_path: StringProperty(
        name="Backend Python", subtype="FILE_PATH",
        description="Python of the environment made by Kiln's set-up command. Empty: use $KILN_PYTHON, "
                    "else the environment the set-up command recorded in ~/.kiln/backend-python")
    low_vram: BoolProperty(
        name="Low VRAM", default=False,
        description="For graphics cards with 6-8 GB: the model takes two images at a time and decodes one at a "
                    "time. Same results, somewhat slower")
    libraries: CollectionProperty(type=KilnLibrary, name="Asset Libraries")
    use_blender_libraries: BoolProperty(
        name="Include Blender's Asset Libraries", default=True,
        description="Also index the mesh and collection assets of the .blend files in Blender's asset libraries "
                    "(Preferences > File Paths > Asset Libraries)")
    clip_model: StringProperty(
        name="CLIP", default="", subtype="DIR_PATH",
        description="Optional CLIP weights (Hugging Face id such as openai/clip-vit-base-patch32, or a folder): "
                    "libraries are then also searched by what the assets look like. Re-index after changing it")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "backend_mode")
        if self.backend_mode == "CONNECT":
            layout.prop(self, "connection_file")
            layout.label(text="Start it in the backend's environment: python -m backend serve --connection-file",
                         icon="INFO")
        else:
            layout.prop(self, "python_path")
            try:
                layout.label(text=f"Using {find_python(typed_path(self.python_path))}", icon="CHECKMARK")
                found = True
            except BackendError as exc:
                layout.label(text=str(exc)[:120], icon="ERROR")
                found = False
            draw_setup(layout, found)
        layout.prop(self, "low_vram")
        box = layout.box()
        box.label(text="Asset libraries (references for Use References)", icon="ASSET_MANAGER")
        for i, library in enumerate(self.libraries):
            row = box.row(align=True)
            row.prop(library, "path", text="")
            row.operator("kiln.remove_library", text="", icon="X").index = i
        box.prop(self, "use_blender_libraries")
        row = box.row(align=True)
        row.operator("kiln.add_library", icon="ADD")
        row.operator("kiln.index_libraries", icon="FILE_REFRESH")
        box.prop(self, "clip_model")


class KilnSettings(bpy.types.PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What the texture, or the generated object, should show")
    negative_prompt: StringProperty(name="Negative", description="What the result should avoid")
    model: StringProperty(
        name="Model", default=DEFAULT_MODEL, subtype="FILE_PATH", options=BLEND_RELATIVE,
        description="A Hugging Face id, a local diffusers folder, a .safetensors file, or 'tiny' (built-in "
                    "random-weight model that checks the pipeline offline; its output is not art)")
    lora: StringProperty(
        name="LoRA", default="", subtype="FILE_PATH", options=BLEND_RELATIVE,
        description="Optional LoRA fused into the model (Hugging Face id, folder or .safetensors). An LCM-LoRA such "
                    "as latent-consistency/lcm-lora-sdv1-5 makes SD a 4-step model: Kiln then uses its fast schedule")
    lora_weight: FloatProperty(
        name="LoRA Weight", default=1.0, min=protocol.MIN_LORA_WEIGHT, max=protocol.MAX_LORA_WEIGHT, soft_min=0.0,
        description="How much of the LoRA is fused into the model: 1 as trained, less to soften it, negative to "
                    "push away from it")
    vae: StringProperty(
        name="VAE", default="", subtype="FILE_PATH", options=BLEND_RELATIVE,
        description="Optional autoencoder in place of the model's (Hugging Face id, folder or .safetensors). "
                    "madebyollin/taesd (for SD 1.x/2.x) encodes and decodes views several times faster, with "
                    "slightly softer detail: worth it with few-step models, where the VAE takes the most time")
    seed: IntProperty(name="Seed", default=0, min=0, description="Same seed, same settings: same texture")
    texture_size: IntProperty(name="Texture Size", default=1024, min=protocol.MIN_TEXTURE_SIZE,
                              max=protocol.MAX_TEXTURE_SIZE, subtype="PIXEL")
    controlnet: StringProperty(
        name="Depth ControlNet", default="", subtype="FILE_PATH", options=BLEND_RELATIVE,
        description="Optional: a depth ControlNet (Hugging Face id such as lllyasviel/sd-controlnet-depth, a "
                    "folder or a .safetensors file) so the generated views follow the mesh's shape")
    controlnet_weight: FloatProperty(
        name="ControlNet Weight", default=1.0, min=protocol.MIN_CONTROLNET_WEIGHT, max=protocol.MAX_CONTROLNET_WEIGHT,
        description="How strongly the ControlNet makes the views follow the mesh's shape: 1 as trained, less to "
                    "give the prompt more say")
    method: EnumProperty(name="Method", default="sir", items=[
        ("sir", "SIR", "Few-step iterative reconstruction (MicroDreamer): fast, the default"),
        ("sds", "SDS", "Score distillation (DreamFusion): thousands of steps, needs high guidance"),
        ("ssd", "SSD", "Stable score distillation: like SDS, but works at low guidance")])
    refine: BoolProperty(name="Refine Existing Texture", default=False,
                         description="Start from the image on the material's Base Color instead of blank; "
                                     "the original material is kept")
    strength: FloatProperty(name="Strength", default=0.5, min=protocol.MIN_STRENGTH, max=protocol.MAX_STRENGTH,
                            description="How far the result may move from the existing texture")
    selected_faces: BoolProperty(name="Only Selected Faces", default=False,
                                 description="Repaint only the faces selected in Edit Mode; the others keep their "
                                             "texture, and the repainted ones are made to fit it")
    steps: IntProperty(name="Steps", default=0, min=0, max=protocol.MAX_STEPS,
                       description="Iterations of the method; 0 uses the method's preset")
    use_references: BoolProperty(
        name="Use References", default=False,
        description="Start from and warm the result up toward reference assets (ReDream): assets found in your "
                    "indexed libraries (Preferences > Add-ons > Kiln), or an object of yours")
    reference_source: EnumProperty(name="Source", default="LIBRARY", items=[
        ("LIBRARY", "Libraries", "Assets from your indexed libraries: the ones ticked below, or the nearest to the "
                                 "prompt when none were searched for"),
        ("OBJECT", "Object", "One of your objects, with its texture: refine this asset toward the prompt")])
    reference_object: PointerProperty(name="Reference", type=bpy.types.Object, poll=_is_mesh,
                                      description="The mesh whose shape and texture the result starts from")
    hits: CollectionProperty(type=KilnHit, name="Found References")
    adapt_prior: BoolProperty(
        name="Adapt Model", default=False,
        description="Before the job, train a small LoRA of the model on views of the references (cached), so the "
                    "model knows their sides and backs (ReDream's adaptation; slower the first time)")
    delta_denoising: BoolProperty(
        name="Delta Denoising", default=False,
        description="SDS/SSD: every few steps, subtract what the model would change on the reference itself, "
                    "keeping the result nearer the reference")
    guidance: FloatProperty(name="Guidance", default=0.0, min=0.0, max=protocol.MAX_GUIDANCE,
                            description="Classifier-free guidance; 0 uses the method's preset "
                                        "(SIR and SSD 7.5, SDS 100)")


CLASSES = (KilnLibrary, KilnHit, KilnPreferences, KilnSettings)


def register() -> None:
    bpy.types.Scene.kiln = bpy.props.PointerProperty(type=KilnSettings)


def unregister() -> None:
    del bpy.types.Scene.kiln


def backend_found(prefs: KilnPreferences) -> bool:
    try:
        find_python(typed_path(prefs.python_path))
    except BackendError:
        return False
    return True


def draw_setup(layout: bpy.types.UILayout, found: bool) -> None:
    """The Set Up Backend button, and how its install is going or went."""
    from . import operators
    setup = operators.SETUP
    row = layout.row()
    row.operator("kiln.setup_backend", text="Set Up Backend…" if not found else "Reinstall Backend…", icon="IMPORT")
    if setup is None:
        return
    if not setup.done.is_set():
        row.label(text=f"Setting up: {setup.status}", icon="TIME")
    elif setup.error:
        for line in [setup.error.splitlines()[0], *list(setup.lines)[-3:]]:
            layout.label(text=line[:140], icon="ERROR")
    else:
        row.label(text=f"Set up: {setup.python}", icon="CHECKMARK")


def preferences(context: bpy.types.Context) -> KilnPreferences:
    return context.preferences.addons[__package__].preferences


def backend_choice(context: bpy.types.Context) -> BackendChoice:
    prefs = preferences(context)
    if prefs.backend_mode == "CONNECT":
        return BackendChoice(connection_file=typed_path(prefs.connection_file))
    return BackendChoice(python_preference=typed_path(prefs.python_path))


def typed_path(text: str) -> str:
    """A path from a field as an absolute one: relative to the .blend ("//", as the file browser
    writes it), typed with "~", or pasted with spaces or quotes around it (Windows' Copy as Path
    quotes). Anything else (a Hugging Face id, 'tiny') comes back as typed."""
    return os.path.expanduser(bpy.path.abspath(text.strip().strip('"\'').strip()))


def kiln_folders(prefs: KilnPreferences) -> list[str]:
    return [typed_path(lib.path) for lib in prefs.libraries if lib.path.strip()]


def blend_folders(context: bpy.types.Context) -> list[str]:
    """Folders searched for .blend assets: Kiln's own, and Blender's asset libraries if included."""
    prefs = preferences(context)
    blender = [lib.path for lib in context.preferences.filepaths.asset_libraries] if prefs.use_blender_libraries \
        else []
    return kiln_folders(prefs) + blender


def library_fields(prefs: KilnPreferences) -> dict[str, object]:
    """The job fields that point the backend at the artist's asset libraries: Kiln's folders, and
    the folder of assets exported from .blend files once there are any."""
    from .blend_assets import cache_root

    exported = [str(cache_root())] if any(p.is_dir() for p in cache_root().iterdir()) else []
    clip = typed_path(prefs.clip_model)
    return {"libraries": kiln_folders(prefs) + exported, **({"clip": clip} if clip else {})}
