"""Generate objects headless: ``blender -b scene.blend --python examples/batch_generate.py -- --prompt ...``

Each prompt becomes a textured object at the 3D cursor (one after another, offset along X). Exits
0 when every object was generated and 1 otherwise, with the reason on stderr.
"""

import argparse
import os
import sys

import bpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from batch_texture import add_shared_options, configure, refusal, save  # noqa: E402


def parse() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    parser = argparse.ArgumentParser(prog="batch_generate.py")
    parser.add_argument("--prompt", required=True, action="append", help="repeat for several objects")
    add_shared_options(parser)
    parser.add_argument("--spacing", type=float, default=2.5, help="X offset between objects")
    return parser.parse_args(argv)


def main() -> int:
    args = parse()
    settings = configure(args, "batch_generate.py")
    if settings is None:
        return 1
    made = []
    cursor = bpy.context.scene.cursor
    start = cursor.location.copy()
    for prompt in args.prompt:
        settings.prompt = prompt
        try:
            bpy.ops.kiln.generate_object()
        except RuntimeError as exc:
            print(f"batch_generate.py: {prompt!r}: {refusal(exc)}", file=sys.stderr)
            return 1
        made.append(bpy.context.view_layer.objects.active.name)
        cursor.location.x += args.spacing
    cursor.location = start  # the artist's cursor is saved with the file, not where the last object went
    if not save(args, "batch_generate.py"):
        return 1
    print(f"batch_generate.py: generated {', '.join(made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
