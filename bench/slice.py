"""Vertical-slice figures, measured in real Blender (the bpy module) on this machine's CPU.

    .venv-blender/bin/python bench/slice.py [--repeats 5]

Run with a Blender environment's Python (``python3 build.py test`` makes ``.venv-blender``); the
backend runs from the backend's environment (``.venv``, or ``KILN_BACKEND_PYTHON``), as in Blender.

1. Time to apply one texture update of each size in Blender (the add-on's own code path:
   RGBA8 from the wire → float buffer → ``foreach_set`` → ``update``), median of N.
2. Blender's main-thread time to keep a finished texture as a PNG beside the .blend, for a
   texture-like frame (smooth colours, fine grain) of each size: ``Image.save`` on the main thread
   (how Kiln did it) against Kiln's way (``scene_io.save_texture`` encodes on a worker thread,
   ``saved_texture`` points the image at the file, and Blender reads it back: timed here by
   reading the pixels, which also copies them, so it is an upper bound), median of N.
3. Starting a refine job from a procedural material, which Cycles bakes on the main thread
   (``session.target_for``), on a 50k-face sphere at 1024² and 2048², median of N.
4. The tiny-model texture job end to end from the operator: cold (backend start included) and
   warm (backend running, model cached).
5. The same job from the CLI, without Blender.
6. The batch script (``examples/batch_texture.py``), one fresh Blender process per run as a
   pipeline runs it: with its own backend each time, and with a standing backend
   (``serve --connection-file``) that keeps the model loaded between runs.

Prints a table and writes ``bench/results/slice.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("BLENDER_USER_RESOURCES", tempfile.mkdtemp(prefix="kiln-bench-blender-"))

import bpy  # noqa: E402

import build  # noqa: E402
from backend import protocol  # noqa: E402

BACKEND_PYTHON = os.environ.get("KILN_BACKEND_PYTHON") or str(build.venv_python(build.VENV))


def install() -> object:
    zip_path = build.build(Path(tempfile.mkdtemp(prefix="kiln-bench-dist-")))
    bpy.ops.extensions.package_install_files(filepath=str(zip_path), repo="user_default", enable_on_install=True)
    package = next(name for name in bpy.context.preferences.addons.keys() if name.endswith(".kiln"))
    bpy.context.preferences.addons[package].preferences.python_path = BACKEND_PYTHON
    return importlib.import_module(package)


def texture_updates(kiln, repeats: int) -> dict[int, float]:
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.mesh.primitive_cube_add()
    obj = bpy.context.active_object
    results = {}
    for size in (1024, 2048, 4096):
        live = kiln.scene_io.start_live_texture(obj, "UVMap", (size, size))
        rng = np.random.default_rng(size)
        frames = [rng.integers(0, 256, (size, size, 4), dtype=np.uint8) for _ in range(2)]
        times = []
        for i in range(repeats + 1):
            frame = frames[i % 2]
            arr = protocol.array("|u1", frame.shape, frame)
            start = time.perf_counter()
            live.update(arr)
            times.append(time.perf_counter() - start)
        results[size] = statistics.median(times[1:]) * 1000  # the first call allocates the buffer
    return results


def texture_like(size: int) -> np.ndarray:
    """(size, size, 4) uint8 like a texture as PNG sees it: smooth colour fields with a fine grain.
    Noise would be the worst case for any encoder, a flat colour the best."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    grain = np.random.default_rng(size).normal(0, 6, (size, size, 3)).astype(np.float32)
    rgb = np.stack([np.sin(9 * x + 4 * y), np.cos(7 * y - 3 * x), np.sin(5 * (x + y) ** 2)], -1) * 90 + 128 + grain
    return np.concatenate([np.clip(rgb, 0, 255).astype(np.uint8), np.full((size, size, 1), 255, np.uint8)], -1)


def texture_finish(kiln, repeats: int) -> dict[int, dict[str, float]]:
    """Main-thread milliseconds to keep a finished texture, Blender's save against Kiln's, and
    the worker thread's milliseconds, per size (median of ``repeats``)."""
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(Path(tempfile.mkdtemp(prefix="kiln-bench-finish-")) / "bench.blend"))
    bpy.ops.mesh.primitive_cube_add()
    obj = bpy.context.active_object
    results = {}
    for size in (1024, 2048, 4096):
        frame = texture_like(size)
        arr = protocol.array("|u1", frame.shape, frame)
        buffer = np.empty(size * size * 4, np.float32)
        blender, kiln_main, worker = [], [], []
        for _ in range(repeats):
            live = kiln.scene_io.start_live_texture(obj, "UVMap", (size, size))
            live.update(arr)
            image = live.image
            image.filepath_raw = str(Path(bpy.path.abspath("//")) / f"blender_{size}.png")
            image.file_format = "PNG"
            start = time.perf_counter()
            image.save()
            blender.append(time.perf_counter() - start)

            live = kiln.scene_io.start_live_texture(obj, "UVMap", (size, size))
            live.update(arr)
            start = time.perf_counter()
            made = kiln.scene_io.save_texture(live, 0)
            started = time.perf_counter() - start
            while not made.done:
                time.sleep(0.001)
            worker.append(time.perf_counter() - start)
            start = time.perf_counter()
            kiln.scene_io.saved_texture(live, made)
            live.image.pixels.foreach_get(buffer)  # Blender reads the PNG back
            kiln_main.append(started + time.perf_counter() - start)
        results[size] = {"blender_save_ms": statistics.median(blender) * 1000,
                         "kiln_main_thread_ms": statistics.median(kiln_main) * 1000,
                         "kiln_worker_ms": statistics.median(worker) * 1000}
    return results


def refine_bake(kiln, repeats: int) -> dict[int, float]:
    """Seconds Blender's main thread takes to read what a procedural material shows as a refine
    job starts (``session.target_for``, Cycles baking it), on a 50k-face sphere, per size."""
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.mesh.primitive_uv_sphere_add(segments=250, ring_count=200)
    obj = bpy.context.active_object
    material = bpy.data.materials.new("Stone")
    if not material.node_tree:
        material.use_nodes = True
    tree = material.node_tree
    bsdf = next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED")
    tree.links.new(tree.nodes.new("ShaderNodeTexNoise").outputs["Color"], bsdf.inputs["Base Color"])
    obj.data.materials.append(material)
    results = {}
    for size in (1024, 2048):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kiln.session.target_for(obj, refine=True, size=size)
            times.append(time.perf_counter() - start)
        results[size] = statistics.median(times)
    return results


def operator_job(kiln, size: int, steps: int) -> float:
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.wm.save_as_mainfile(filepath=str(Path(tempfile.mkdtemp()) / "bench.blend"))
    bpy.ops.mesh.primitive_monkey_add()
    settings = bpy.context.scene.kiln
    settings.prompt, settings.model, settings.texture_size, settings.steps = "a bronze statue", "tiny", size, steps
    start = time.perf_counter()
    bpy.ops.kiln.texture_selected()
    return time.perf_counter() - start


def cli_job(size: int, steps: int) -> float:
    out = tempfile.mkdtemp(prefix="kiln-bench-cli-")
    start = time.perf_counter()
    subprocess.run([BACKEND_PYTHON, "-m", "backend", "texture", str(ROOT / "examples" / "vase.obj"), "--prompt",
                    "a glazed vase", "--size", str(size), "--steps", str(steps), "--out", out],
                   cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - start


def batch_runs(repeats: int, steps: int) -> dict[str, float]:
    """Seconds per batch run, median of ``repeats``: its own backend, and a standing one (whose
    first run, which loads the model, is reported apart)."""
    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-batch-"))
    blend, connection = folder / "batch.blend", folder / "backend.json"
    bpy.ops.wm.read_homefile()  # the default cube
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    script = ("import sys, runpy, bpy; bpy.ops.wm.open_mainfile(filepath=sys.argv[1]); sys.argv = ['blender', '--'] "
              f"+ sys.argv[2:]; runpy.run_path({str(ROOT / 'examples' / 'batch_texture.py')!r}, run_name='__main__')")

    def run(*extra: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", script, str(blend), "--prompt", "a crate", "--model", "tiny", "--size",
                        "1024", "--steps", str(steps), "--backend-python", BACKEND_PYTHON, *extra],
                       check=True, capture_output=True)
        return time.perf_counter() - start

    standing = subprocess.Popen([BACKEND_PYTHON, "-m", "backend", "serve", "--connection-file", str(connection)],
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        standing.stdout.readline()  # its ready line: the connection file is written
        own = [run() for _ in range(repeats)]
        shared = [run("--connection-file", str(connection)) for _ in range(repeats + 1)]
    finally:
        standing.terminate()
        standing.wait()
    return {"own_backend_s": statistics.median(own), "standing_first_s": shared[0],
            "standing_s": statistics.median(shared[1:])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="SIR iterations (the pipeline-check preset's)")
    args = parser.parse_args()
    kiln = install()
    updates = texture_updates(kiln, args.repeats)
    finishes = texture_finish(kiln, args.repeats)
    bakes = refine_bake(kiln, args.repeats)
    cold = operator_job(kiln, 1024, args.steps)
    warm = operator_job(kiln, 1024, args.steps)
    cli = cli_job(1024, args.steps)
    kiln.session.MANAGER.stop()
    batch = batch_runs(args.repeats, args.steps)
    rows = [(f"apply {s}² texture update in Blender (median of {args.repeats})", f"{ms:.1f} ms")
            for s, ms in updates.items()]
    for s, f in finishes.items():
        rows += [(f"keep a finished {s}² texture as PNG: Image.save, Blender's main thread",
                  f"{f['blender_save_ms']:.0f} ms"),
                 ("  Kiln: main thread (start, point the image at the file, read it back)",
                  f"{f['kiln_main_thread_ms']:.0f} ms"),
                 ("  Kiln: the worker thread, encoding and writing, meanwhile", f"{f['kiln_worker_ms']:.0f} ms")]
    rows += [(f"refine start, procedural material baked, 50k-face sphere, {s}² (median of {args.repeats})",
              f"{b:.2f} s") for s, b in bakes.items()]
    rows += [(f"tiny job, Suzanne, 1024², {args.steps} iterations, operator, cold backend", f"{cold:.1f} s"),
             (f"tiny job, Suzanne, 1024², {args.steps} iterations, operator, warm backend", f"{warm:.1f} s"),
             (f"tiny job, vase.obj, 1024², {args.steps} iterations, CLI (process start included)", f"{cli:.1f} s"),
             (f"batch script run, cube, 1024², {args.steps} iterations, its own backend (median of {args.repeats})",
              f"{batch['own_backend_s']:.1f} s"),
             ("  the same with a standing backend: first run (loads the model)", f"{batch['standing_first_s']:.1f} s"),
             (f"  the same with a standing backend: later runs (median of {args.repeats})",
              f"{batch['standing_s']:.1f} s")]
    width = max(len(r[0]) for r in rows)
    print(f"Kiln vertical slice — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Blender {bpy.app.version_string}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "slice.json").write_text(json.dumps({
        "blender": bpy.app.version_string, "cpu_count": os.cpu_count(), "steps": args.steps,
        "texture_update_ms": updates, "texture_finish": finishes, "refine_bake_s": bakes,
        "operator_cold_s": cold, "operator_warm_s": warm,
        "cli_s": cli, "batch": batch, "date": time.strftime("%Y-%m-%d")}, indent=2))


if __name__ == "__main__":
    main()
