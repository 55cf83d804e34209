"""Texture meshes headless: ``blender -b scene.blend --python examples/batch_texture.py -- --prompt ...``

Exits 0 when every object was textured and 1 otherwise, with the reason on stderr, so pipelines
can trust the exit code (Blender itself exits 0 after a failed script unless told otherwise).
"""

import argparse
import sys

import bpy


def add_shared_options(parser: argparse.ArgumentParser) -> None:
    """The options both batch scripts take; ``configure`` puts them into the scene's settings."""
    parser.add_argument("--negative", default="")
    parser.add_argument("--model", default=None, help="default: the scene's Kiln model")
    parser.add_argument("--lora", default="", help="a LoRA fused into the model, e.g. an LCM-LoRA for 4-step SD")
    parser.add_argument("--vae", default="", help="an autoencoder in place of the model's, e.g. madebyollin/taesd "
                        "(SD 1.x/2.x): faster, slightly softer")
    parser.add_argument("--method", choices=["sir", "sds", "ssd"], default="sir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=1024, help="texture size")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--backend-python", default=None, help="default: the add-on's preference")
    parser.add_argument("--low-vram", action="store_true", help="bound GPU memory for 6 GB cards")
    parser.add_argument("--save", action="store_true", help="save the .blend afterwards")


def parse() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    parser = argparse.ArgumentParser(prog="batch_texture.py")
    parser.add_argument("--prompt", required=True)
    add_shared_options(parser)
    parser.add_argument("--controlnet", default="", help="a depth ControlNet: HF id, folder or .safetensors")
    parser.add_argument("--refine", action="store_true", help="start from each object's existing texture")
    parser.add_argument("--strength", type=float, default=0.5, help="refine only: 0.05 keeps, 1 repaints")
    parser.add_argument("--objects", nargs="*", help="object names (default: every mesh in the scene)")
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


def configure(args: argparse.Namespace, script: str):
    """Enable Kiln and put the options both batch scripts share into the scene's Kiln settings;
    None (after saying why on stderr) when an option is out of range."""
    package = enable_kiln()
    prefs = bpy.context.preferences.addons[package].preferences
    if args.backend_python:
        prefs.python_path = args.backend_python
    prefs.low_vram = args.low_vram
    if not 512 <= args.size <= 4096:
        print(f"{script}: --size {args.size} is out of range: choose 512 to 4096", file=sys.stderr)
        return None
    settings = bpy.context.scene.kiln
    settings.negative_prompt, settings.seed, settings.method = args.negative, args.seed, args.method
    settings.texture_size, settings.lora, settings.vae = args.size, args.lora, args.vae
    if args.model:
        settings.model = args.model
    if args.steps is not None:
        settings.steps = args.steps
    if args.guidance is not None:
        settings.guidance = args.guidance
    return settings


def main() -> int:
    args = parse()
    settings = configure(args, "batch_texture.py")
    if settings is None:
        return 1
    settings.prompt, settings.refine, settings.strength = args.prompt, args.refine, args.strength
    settings.controlnet = args.controlnet
    names = args.objects or [o.name for o in bpy.context.scene.objects if o.type == "MESH"]
    missing = [n for n in names if n not in bpy.context.scene.objects]
    if missing or not names:
        print(f"batch_texture.py: no such objects: {missing or 'no meshes in the scene'}", file=sys.stderr)
        return 1
    for obj in bpy.context.scene.objects:
        obj.select_set(obj.name in names)
    bpy.context.view_layer.objects.active = bpy.context.scene.objects[names[0]]
    try:
        bpy.ops.kiln.texture_selected()
    except RuntimeError as exc:
        print(f"batch_texture.py: {exc}", file=sys.stderr)
        return 1
    if args.save and bpy.data.filepath:
        bpy.ops.wm.save_mainfile()
    print(f"batch_texture.py: textured {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
