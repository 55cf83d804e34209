"""Texture meshes headless: ``blender -b scene.blend --python examples/batch_texture.py -- --prompt ...``

Exits 0 when every object was textured and 1 otherwise, with the reason on stderr, so pipelines
can trust the exit code (Blender itself exits 0 after a failed script unless told otherwise).
"""

import argparse
import os
import re
import sys

import bpy


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """The options both batch scripts take; ``configure`` puts them into the scene's settings."""
    parser.add_argument("--negative", default="")
    parser.add_argument("--model", default=None, help="default: the scene's Kiln model")
    parser.add_argument("--lora", default="", help="a LoRA fused into the model, e.g. an LCM-LoRA for 4-step SD")
    parser.add_argument("--lora-weight", type=float, default=1.0, help="how much of the LoRA: 1 as trained (default)")
    parser.add_argument("--vae", default="", help="an autoencoder in place of the model's, e.g. madebyollin/taesd "
                        "(SD 1.x/2.x): faster, slightly softer")
    parser.add_argument("--method", type=str.lower, choices=["sir", "sds", "ssd"], default="sir")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same settings: same result (default 0)")
    parser.add_argument("--size", type=int, default=1024, help="texture size")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--backend-python", default=None, help="default: the add-on's preference")
    parser.add_argument("--connection-file", nargs="?", const="", default=None,
                        help="use the backend already running with this file (`python -m backend serve "
                             "--connection-file`; default file ~/.kiln/backend.json): many batch runs then share "
                             "one loaded model")
    parser.add_argument("--low-vram", action="store_true", help="bound GPU memory for 6 GB cards")
    parser.add_argument("--save", nargs="?", const="", default=None, metavar="BLEND",
                        help="save the .blend afterwards: over the file Blender opened, or as BLEND")


def parse() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    parser = argparse.ArgumentParser(prog="batch_texture.py")
    parser.add_argument("--prompt", required=True, help="what the textures should show")
    add_shared_options(parser)
    parser.add_argument("--controlnet", default="", help="a depth ControlNet: HF id, folder or .safetensors")
    parser.add_argument("--controlnet-weight", type=float, default=1.0,
                        help="how strongly the ControlNet steers: 1 as trained (default)")
    parser.add_argument("--refine", action="store_true", help="start from each object's existing texture")
    parser.add_argument("--strength", type=float, default=None,
                        help="refine only: 0.05 keeps, 1 repaints (default: the scene's, 0.5 in a new one)")
    parser.add_argument("--selected-faces", action="store_true",
                        help="refine only: repaint only the faces selected in Edit Mode in the .blend; the others "
                             "keep their texture")
    parser.add_argument("--objects", nargs="*", help="object names (default: every mesh in the view layer, hidden "
                        "ones too)")
    return parser.parse_args(argv)


def enable_kiln() -> str:
    for name in bpy.context.preferences.addons.keys():
        if name.endswith(".kiln"):
            return name
    for module in ("bl_ext.user_default.kiln", "bl_ext.blender_org.kiln"):
        try:
            bpy.ops.preferences.addon_enable(module=module)
            return module
        except Exception:  # not installed under that repository
            continue
    sys.exit("batch_texture.py: the Kiln extension is not installed; install dist/kiln-*.zip first")


def refusal(exc: RuntimeError) -> str:
    """Kiln's own words from an operator's RuntimeError, without the wrapping Blender adds for a
    report ("Error: ") or a poll message ("Operator bpy.ops.kiln.texture_selected.poll() ...")."""
    return re.sub(r"^(Error: |Operator bpy\.ops\.\S+\.poll\(\) )", "", str(exc).strip())


def assign(settings, values: dict[str, tuple[str, object]], script: str) -> bool:
    """Set the scene's Kiln settings from ``values`` (property: (option, value)). Blender clamps a
    number outside a property's limits without a word, so a pipeline would get a job it did not ask
    for: an out-of-range number is refused instead (False, after saying why on stderr)."""
    for name, (option, value) in values.items():
        prop = settings.bl_rna.properties.get(name)
        if prop is None:  # this script is newer than the extension Blender has installed
            print(f"{script}: {option} needs a newer Kiln than the one installed in this Blender: install "
                  "dist/kiln-*.zip from the same checkout as this script (python3 build.py builds it)", file=sys.stderr)
            return False
        if prop.type in ("INT", "FLOAT") and not prop.hard_min <= value <= prop.hard_max:
            low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (prop.hard_min, prop.hard_max))
            print(f"{script}: {option} {value} is out of range: choose {low} to {high}", file=sys.stderr)
            return False
        setattr(settings, name, value)
    return True


def configure(args: argparse.Namespace, script: str):
    """Enable Kiln and put the options both batch scripts share into the scene's Kiln settings;
    None (after saying why on stderr) when an option is out of range."""
    if args.save == "" and not bpy.data.filepath:  # said before the job, not found missing after it
        print(f"{script}: --save has no file to save over (Blender opened none): give one, --save scene.blend",
              file=sys.stderr)
        return None
    folder = os.path.dirname(os.path.abspath(args.save or "."))
    if args.save and not os.path.isdir(folder):
        print(f"{script}: --save {args.save}: the folder {folder} does not exist", file=sys.stderr)
        return None
    package = enable_kiln()
    prefs = bpy.context.preferences.addons[package].preferences
    if args.backend_python:
        prefs.python_path = args.backend_python
    if args.connection_file is not None:
        prefs.backend_mode, prefs.connection_file = "CONNECT", args.connection_file
    prefs.low_vram = args.low_vram
    settings = bpy.context.scene.kiln
    values = {"negative_prompt": ("--negative", args.negative), "seed": ("--seed", args.seed),
              "method": ("--method", args.method), "texture_size": ("--size", args.size),
              "lora": ("--lora", args.lora), "lora_weight": ("--lora-weight", args.lora_weight),
              "vae": ("--vae", args.vae)}
    for name, option in (("model", "--model"), ("steps", "--steps"), ("guidance", "--guidance")):
        if getattr(args, name) is not None:
            values[name] = (option, getattr(args, name))
    return settings if assign(settings, values, script) else None


def save(args: argparse.Namespace, script: str) -> bool:
    """Save the .blend as ``--save`` asks (nothing without it); False, after saying why on stderr,
    when it cannot be written."""
    try:
        if args.save:
            bpy.ops.wm.save_as_mainfile(filepath=os.path.abspath(args.save))
        elif args.save is not None:
            bpy.ops.wm.save_mainfile()
    except RuntimeError as exc:
        print(f"{script}: could not save the .blend: {exc}", file=sys.stderr)
        return False
    return True


def select(targets: list) -> bool:
    """Select just ``targets``, the ones hidden in the viewport too: Blender selects no hidden
    object, and one the artist had hidden went untextured while the script said it was done. False,
    after saying why, for one that a hidden collection keeps from being selected."""
    for obj in bpy.context.scene.objects:
        obj.select_set(False)
    for obj in targets:
        obj.hide_set(False)
        obj.hide_viewport = obj.hide_select = False
        obj.select_set(True)
    kept = [obj.name for obj in targets if not obj.select_get()]
    if kept:
        print(f"batch_texture.py: {', '.join(kept)} cannot be selected in this view layer (a collection that holds "
              "it is hidden): show that collection, or leave it out of --objects", file=sys.stderr)
        return False
    bpy.context.view_layer.objects.active = targets[0]
    return True


def main() -> int:
    args = parse()
    settings = configure(args, "batch_texture.py")
    if settings is None:
        return 1
    if args.strength is not None and not args.refine:
        print("batch_texture.py: --strength sets how far refining may move a texture, and this job starts blank: "
              "add --refine, or drop --strength", file=sys.stderr)
        return 1
    if args.selected_faces and not args.refine:
        print("batch_texture.py: --selected-faces keeps the other faces' texture, and this job starts blank: "
              "add --refine", file=sys.stderr)
        return 1
    values = {"prompt": ("--prompt", args.prompt), "refine": ("--refine", args.refine),
              "selected_faces": ("--selected-faces", args.selected_faces),
              "controlnet": ("--controlnet", args.controlnet),
              "controlnet_weight": ("--controlnet-weight", args.controlnet_weight)}
    if args.strength is not None:
        values["strength"] = ("--strength", args.strength)
    if not assign(settings, values, "batch_texture.py"):
        return 1
    # By default the meshes of the view layer: those of an excluded collection are not in the scene as rendered.
    names = args.objects or [o.name for o in bpy.context.view_layer.objects if o.type == "MESH"]
    missing = [n for n in names if n not in bpy.context.scene.objects]
    if missing or not names:
        print(f"batch_texture.py: no such objects: {missing or 'no meshes in the scene'}", file=sys.stderr)
        return 1
    targets = [bpy.context.scene.objects[n] for n in names]
    excluded = [obj.name for obj in targets if obj.name not in bpy.context.view_layer.objects]
    if excluded:
        print(f"batch_texture.py: {', '.join(excluded)} is in a collection excluded from the view layer: include "
              "that collection (its checkbox in the Outliner), or leave it out of --objects", file=sys.stderr)
        return 1
    hidden = [(obj, obj.hide_get(), obj.hide_viewport, obj.hide_select) for obj in targets]
    try:
        if not select(targets):
            return 1
        bpy.ops.kiln.texture_selected()
    except RuntimeError as exc:
        print(f"batch_texture.py: {refusal(exc)}", file=sys.stderr)
        return 1
    finally:  # the artist's hidden objects stay hidden in the file
        for obj, hide, hide_viewport, hide_select in hidden:
            obj.hide_set(hide)
            obj.hide_viewport, obj.hide_select = hide_viewport, hide_select
    if not save(args, "batch_texture.py"):
        return 1
    print(f"batch_texture.py: textured {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
