"""``python -m backend``: the server Blender spawns, and headless texturing and generation for pipelines.

The CLI runs the very jobs the server runs (``jobs.run_texture_job``, ``jobs.run_generate_job``)
and exits non-zero with the reason on stderr when anything fails, so batch scripts can trust its
exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from . import protocol
from .assets import base_colour, image_rgb, texture_tensor
from .events import TextureEvents
from .gpu import device_label, no_kernel_fix
from .jobs import JobError, JobRequest, ModelCache, describe_failure, run_generate_job, run_texture_job
from .mesh import SMOOTH_ANGLE_DEG, Mesh, MeshError, shaded_vertices
from .mesh_file import MESH_SUFFIXES, load_mesh_file, missing_texture, parts_without_uvs, texture_placement_problem
from .presets import GENERATE_PRESETS, METHODS, PRESETS
from .prior import ModelError
from .texture import SlotTextures
from .tiles import udim_numbers


#: In a log, a progress line at most this often (besides one for each new phase).
LOG_EVERY_S = 10.0


class ConsoleEvents(TextureEvents):
    """Progress on stderr, the last texture kept for writing out. In a terminal, a tqdm bar; in a
    log (stderr a pipeline's file, a render farm's console) plain lines, one for each new phase and
    at most one every ``LOG_EVERY_S`` besides: there a bar's carriage returns made the whole job one
    line, tens of kilobytes long."""

    def __init__(self, interactive: bool | None = None) -> None:
        from tqdm import tqdm

        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = tqdm(total=1, unit="update", file=sys.stderr, dynamic_ncols=True) if interactive else None
        self.started, self.logged = time.monotonic(), -LOG_EVERY_S
        self.phases: set[str] = set()
        self.last_logged: tuple[str, bool] = ("", False)  # a phase's last count is logged once
        self.phase = ""
        self.final = None
        self.reference_used: dict[str, object] | None = None

    def __enter__(self) -> "ConsoleEvents":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()  # an error then prints on a line of its own, not after the bar

    def progress(self, done: int, total: int, phase: str) -> None:
        """Through tqdm's rate limit, or the log's, so that a long job does not write a line per
        update; but a new phase that holds the count still (extracting, unwrapping) shows at once,
        since no update comes to show it while it runs."""
        if self.bar is None:
            now, new, end = time.monotonic(), phase not in self.phases, (phase, done >= total)
            if new or now - self.logged >= LOG_EVERY_S or (end[1] and end != self.last_logged):
                self.last_logged = end
                self.phases.add(phase)
                self.logged = now
                print(f"kiln: {phase} {done}/{total} ({done / max(total, 1):.0%}, {now - self.started:.0f} s)",
                      file=sys.stderr, flush=True)
            return
        still, changed, self.phase = done == self.bar.n, phase != self.phase, phase
        self.bar.total = total
        self.bar.set_description(phase, refresh=False)
        if not self.bar.update(done - self.bar.n) and changed and still:
            self.bar.refresh()

    def texture(self, rgba, final: bool) -> None:
        if final:
            self.final = rgba.numpy()

    def reference(self, file: str, score: float, yaw: float, thumbnails) -> None:
        self.reference_used = {"file": file, "score": round(score, 4), "yaw": yaw}

    def used(self) -> dict[str, object]:
        """What result.json records about the job's inputs beyond the request."""
        return {"reference": self.reference_used} if self.reference_used else {}

    def log(self, text: str) -> None:
        if self.bar is None:
            print(text, file=sys.stderr, flush=True)
        else:
            self.bar.write(text, file=sys.stderr)


#: The summary every CLI job writes beside its results.
SUMMARY_FILE = "result.json"


def result_paths(out: Path, name: str) -> dict[str, Path]:
    """Where a job on the mesh ``name`` writes its texture, its textured mesh and its summary."""
    return {"texture": out / f"{name}_texture.png", "mesh": out / f"{name}.glb", "summary": out / SUMMARY_FILE}


def keep_inputs(args: argparse.Namespace, out: Path) -> None:
    """Refuse, before any work, an --out where a result would be written over one of the job's own
    input files: with --out the mesh's folder, its .glb would be replaced by the result."""
    written = result_paths(out, Path(args.mesh).stem).values()
    for given in filter(None, [args.mesh, args.init_texture, args.repaint_mask, *(args.reference or [])]):
        source = Path(given)
        for target in written:
            if source.is_file() and target.is_file() and target.samefile(source):
                raise JobError(protocol.E_BAD_REQUEST, f"--out {str(out)!r} would write the result {target.name!r} "
                               f"over the input file {given!r}: choose another folder for --out")


def write_result(mesh: Mesh, rgba: np.ndarray, out: Path, source: object | None = None,
                 smooth_angle_deg: float = SMOOTH_ANGLE_DEG) -> dict[str, str]:
    """Write the texture PNG and a textured GLB, placed where the mesh file had it: its node
    carries the mesh's ``origin``, which float32 positions could not hold as finely. The texture is
    the Base Color of a dielectric material (trimesh's default would tint it 0.4 grey, and glTF
    reads a missing metallic factor as fully metal). ``source``, the trimesh object the mesh was
    read from: when the texture is on its own UVs, its PBR material (metal, roughness, normal map)
    is kept with the new Base Color, as Kiln does in Blender. Edges sharper than ``smooth_angle_deg``
    are hard (``shaded_vertices``)."""
    import trimesh
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.ascontiguousarray(rgba[::-1, :, :3]))  # rows bottom-up → PNG's top-down
    paths = result_paths(out, mesh.name)
    png = paths["texture"]
    image.save(png)
    positions, uvs, normals, faces = shaded_vertices(mesh, smooth_angle_deg)
    material = getattr(getattr(source, "visual", None), "material", None)
    own_uvs = getattr(getattr(source, "visual", None), "uv", None)
    if isinstance(material, trimesh.visual.material.PBRMaterial) and own_uvs is not None \
            and np.allclose(np.asarray(own_uvs)[mesh.triangles], mesh.corner_uvs):  # not a UDIM's cells
        material = material.copy()
        material.baseColorTexture, material.baseColorFactor = image, None
    else:
        material = trimesh.visual.material.PBRMaterial(baseColorTexture=image, metallicFactor=0.0,
                                                       roughnessFactor=0.5)
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    glb = paths["mesh"]
    placed = np.eye(4) if mesh.origin is None else trimesh.transformations.translation_matrix(mesh.origin)
    scene = trimesh.Scene()
    scene.add_geometry(trimesh.Trimesh(positions, faces, vertex_normals=normals, visual=visual, process=False),
                       node_name=mesh.name, transform=placed)
    scene.export(glb, include_normals=True)
    return {"texture": str(png), "mesh": str(glb)}


def output_folder(path: str) -> Path:
    """``--out``, made and checked before the job, so minutes of work are not lost at the end to a
    folder that cannot be written."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise JobError(protocol.E_BAD_REQUEST, f"--out {path!r} is a file, and Kiln writes a folder of results "
                       "(texture, mesh, result.json): name a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise JobError(protocol.E_BAD_REQUEST, f"cannot make the --out folder {path!r}: {exc.strerror}") from None
    if not os.access(out, os.W_OK):
        raise JobError(protocol.E_BAD_REQUEST, f"the --out folder {path!r} is not writable: choose another")
    return out


def partial_uv_map(args: argparse.Namespace, mesh: Mesh, loaded: object) -> None:
    """A file whose parts have UVs only in part: a blank start unwraps the whole mesh (its parts
    without UVs would each take one colour on the map joining them); refining (a repaint mask
    included), which reads the file's UVs, is refused naming the parts."""
    bare = parts_without_uvs(loaded)
    if not bare:
        return
    names = ", ".join(map(repr, bare[:5])) + (f" and {len(bare) - 5} more" if len(bare) > 5 else "")
    parts = f"its part {names} has" if len(bare) == 1 else f"its parts {names} have"
    if refining(args):
        raise JobError(protocol.E_BAD_REQUEST, f"{args.mesh}: {parts} no UV map, so the texture to refine cannot "
                       f"lie on {'it' if len(bare) == 1 else 'them'}: give every part UVs, or texture it from blank")
    print(f"kiln: {args.mesh}: {parts} no UV map, so Kiln unwraps the whole mesh", file=sys.stderr)
    mesh.corner_uvs = None


def refine_texture(args: argparse.Namespace, loaded: object, mesh: Mesh):
    """The texture to refine: --init-texture (each UDIM tile's file, for a name with <UDIM>), else
    the mesh file's own base colour image."""
    if args.init_texture and UDIM_TOKEN in args.init_texture:
        return udim_texture(args.init_texture, mesh)
    if args.init_texture:
        return read_texture(args.init_texture)
    if (problem := texture_placement_problem(Path(args.mesh))) is not None:
        raise JobError(protocol.E_BAD_REQUEST, f"{args.mesh}: {problem}, which Kiln cannot read as it shows: bake it "
                       "to the first UV set (in Blender: refine there, where Kiln bakes it), or pass --init-texture")
    texture = base_colour(loaded)
    if texture is None:
        missing = missing_texture(Path(args.mesh))
        raise JobError(protocol.E_BAD_REQUEST, f"{args.mesh} carries no texture to refine"
                       + (f": {missing}: put the file there, or pass --init-texture" if missing else
                          ": pass --init-texture"))
    return texture


#: The tile number's place in a UDIM texture's file name, as Blender and other painters write it.
UDIM_TOKEN = "<UDIM>"


def read_texture(path: str):
    from PIL import Image

    try:
        return texture_tensor(Image.open(path))
    except OSError as exc:
        raise unreadable_image("--init-texture", exc) from None


def unreadable_image(option: str, exc: OSError) -> JobError:
    """Pillow's "cannot identify image file" names no way out: an EXR or HDR from a VFX pipeline
    is the usual cause."""
    from PIL import UnidentifiedImageError

    hint = (" (Kiln reads PNG, JPEG, TGA, TIFF, WebP and BMP: save an EXR or HDR as a 16-bit PNG)"
            if isinstance(exc, UnidentifiedImageError) else "")
    return JobError(protocol.E_BAD_REQUEST, f"cannot read {option}: {exc}{hint}")


def udim_texture(pattern: str, mesh: Mesh) -> SlotTextures:
    """A UDIM texture's tiles (``paint.<UDIM>.png``: paint.1001.png, paint.1002.png, ...), each
    for the faces in its tile of the mesh's map, read through that map: the job moves them onto one
    cell per tile (``tiles.pack_tiles``). Faces in a tile without a file start from the first tile."""
    import torch

    if mesh.corner_uvs is None:
        raise JobError(protocol.E_BAD_REQUEST, f"{mesh.name!r} has no UV map to read the UDIM tiles of "
                       "--init-texture through: give it one")
    head, tail = pattern.split(UDIM_TOKEN, 1)
    folder, prefix = Path(head).parent, Path(head).name
    files = {int(path.name[len(prefix):len(path.name) - len(tail)]): path
             for path in folder.glob(f"{prefix}[1-9][0-9][0-9][0-9]{tail}")}
    if not files:
        raise JobError(protocol.E_BAD_REQUEST, f"--init-texture {pattern!r}: no tile files match it (the tiles "
                       f"are named with their numbers for {UDIM_TOKEN}, as {head}1001{tail})")
    uvs = torch.as_tensor(mesh.corner_uvs)
    numbers, tiles = udim_numbers(mesh.corner_uvs), np.array(sorted(files))
    found = np.searchsorted(tiles, numbers).clip(0, len(tiles) - 1)
    slots = torch.as_tensor(np.where(tiles[found] == numbers, found, 0))
    images = [read_texture(str(files[number])) for number in tiles]
    return SlotTextures(images[0], uvs, slots, [(image, uvs) for image in images])


def repaint_faces(path: str, mesh: Mesh) -> np.ndarray:
    """--repaint-mask: the faces whose UV centre lies on the mask's light half, (T,) bool. A mask
    in texture space is what a pipeline has where Blender has a face selection."""
    from PIL import Image

    if mesh.corner_uvs is None:
        raise JobError(protocol.E_BAD_REQUEST, f"{mesh.name!r} has no UV map to read --repaint-mask through: "
                       "give it one")
    try:
        mask = image_rgb(Image.open(path)) @ np.array([0.299, 0.587, 0.114], np.float32)  # PIL's luma weights
    except OSError as exc:
        raise unreadable_image("--repaint-mask", exc) from None
    centres = mesh.corner_uvs.mean(axis=1) % 1.0  # Blender repeats the image, and so the mask, outside 0-1
    height, width = mask.shape
    paint = mask[(centres[:, 1] * height).astype(int).clip(0, height - 1),
                 (centres[:, 0] * width).astype(int).clip(0, width - 1)] >= 0.5
    if not paint.any():
        raise JobError(protocol.E_BAD_REQUEST, f"--repaint-mask {path!r} is dark under every face's UV centre: "
                       "paint it white where faces are to change")
    return paint


def refining(args: argparse.Namespace) -> bool:
    """--init-texture or --repaint-mask alone means refining; --strength without a texture to
    refine would be silently ignored, so it is refused."""
    refine = args.refine or args.init_texture is not None or args.repaint_mask is not None
    if args.strength is not None and not refine:
        raise JobError(protocol.E_BAD_REQUEST, "--strength sets how far refining may move a texture, and this job "
                       "starts blank: add --refine (or --init-texture FILE), or drop --strength")
    return refine


def count_of_hits(text: str) -> int:
    """--count: a whole number of assets, one or more; 0 found nothing and was reported as empty
    libraries."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"{count} lists no asset: give 1 or more")
    return count


def request_from(args: argparse.Namespace, task: str) -> JobRequest:
    return JobRequest.from_fields({
        "task": task, "prompt": args.prompt, "negative_prompt": args.negative, "model": args.model,
        "seed": args.seed, "texture_size": args.size, "steps": args.steps, "guidance": args.guidance,
        "method": args.method, "preset": args.preset,
        **({"strength": args.strength} if getattr(args, "strength", None) is not None else {}),
        "controlnet": getattr(args, "controlnet", None), "controlnet_weight": getattr(args, "controlnet_weight", 1.0),
        "lora": args.lora, "lora_weight": args.lora_weight,
        "vae": args.vae,
        "low_vram": args.low_vram, "offline": args.offline,
        "references": args.reference or [], "libraries": args.library or [], "clip": args.clip,
        "adapt_prior": args.adapt, "delta_denoising": args.delta_denoising})


def finish(request: JobRequest, out: Path, started: float, files: dict[str, str], **extra: object) -> int:
    """result.json, the pipeline-check notice where it applies, and the summary on stdout."""
    from .server import software_versions

    # Everything a rerun needs to give the same result: every setting, and what it ran on.
    summary = {"seconds": round(time.perf_counter() - started, 2), "model": request.model, "seed": request.seed,
               "method": request.method, "pipeline_check": request.model == "tiny", **extra, **files,
               "settings": asdict(request), "device": device_label(), "software": software_versions()}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if request.model == "tiny":
        print(f"PIPELINE CHECK: made with the built-in tiny random-weight model. The {request.task} result is "
              "noise by design; it proves the pipeline runs end to end. Use --model with real weights for art.")
    print(json.dumps(summary, indent=2))
    return 0


def known_failure(exc: Exception, low_vram: bool) -> int:
    """Exit code 2 with the fix when the GPU ran out of memory (Low VRAM first) or has no kernels in
    this torch, which a pipeline can act on; any other exception is a bug and goes on with its
    traceback."""
    failure = describe_failure(exc, low_vram)
    if failure["code"] != protocol.E_OUT_OF_MEMORY and not no_kernel_fix(str(exc)):
        raise exc
    print(f"kiln: error: {failure['message']}", file=sys.stderr)
    return 2


def texture_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        request = request_from(args, protocol.TASK_TEXTURE)
        out = output_folder(args.out)
        keep_inputs(args, out)
        mesh, loaded = load_mesh_file(Path(args.mesh))
        mesh.up_axis = args.up
        partial_uv_map(args, mesh, loaded)
        init = refine_texture(args, loaded, mesh) if refining(args) else None
        if args.repaint_mask:
            mesh.paint = repaint_faces(args.repaint_mask, mesh)
        with ConsoleEvents() as events:
            run_texture_job(request, mesh, events, ModelCache(), init)
    except (JobError, MeshError, ModelError) as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a GPU failure with a known fix gets it; anything else is re-raised
        return known_failure(exc, args.low_vram)
    return finish(request, out, started, write_result(mesh, events.final, out, loaded), **events.used())


def generate_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        request = request_from(args, protocol.TASK_GENERATE)
        out = output_folder(args.out)
        with ConsoleEvents() as events:
            result = run_generate_job(request, events, ModelCache())
    except (JobError, MeshError, ModelError) as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a GPU failure with a known fix gets it; anything else is re-raised
        return known_failure(exc, args.low_vram)
    # glTF is Y-up; the object was made Z-up (Blender's convention): (x, y, z) → (x, z, −y).
    mesh = replace(result.mesh, positions=result.mesh.positions[:, [0, 2, 1]] * np.array([1, 1, -1], np.float32))
    # All smooth, as Generate Object in Blender makes it: a marching-cubes skin has bumps, not hard edges.
    files = write_result(mesh, events.final, out, smooth_angle_deg=180.0)
    return finish(request, out, started, files, stages_s=result.seconds,
                  gaussians=len(result.splats["means"]), triangles=mesh.triangle_count, **events.used())


def index_command(args: argparse.Namespace) -> int:
    """Index each folder; unreadable files are listed with the reason. A folder that cannot be
    indexed, or that ends with no assets (a wrong path, most often), makes the exit code non-zero."""
    import torch
    from tqdm import tqdm

    from .embed import ClipEmbedder, WordLlamaEmbedder
    from .library import asset_files, build_index

    try:
        embedder = WordLlamaEmbedder()
        clip = ClipEmbedder.load(args.clip, args.offline, torch.device("cpu")) if args.clip else None
        empty = False
        for folder in args.folders:
            # Off in a log (disable=None: stderr no terminal), where its frames made one long line.
            with tqdm(total=1, unit="asset", file=sys.stderr, dynamic_ncols=True, disable=None) as bar:
                def progress(done: int, total: int, what: str, bar=bar) -> None:
                    bar.total, bar.n = total, done
                    bar.set_description(what[-40:])
                    bar.refresh()

                index, report = build_index(Path(folder), embedder, clip, progress)
            print(report.summary(index, str(index.root)))
            for line in report.problems():
                print(f"  {line}", file=sys.stderr)
            # Blender's own asset libraries: indexed here they gave "0 assets" and no reason.
            if blends := [p.relative_to(index.root).as_posix() for p in asset_files(index.root, (".blend",))]:
                print(f"  left out {len(blends)} .blend file{'s' if len(blends) > 1 else ''} ({blends[0]}"
                      f"{', …' if len(blends) > 1 else ''}): Kiln reads .blend assets through Blender, which this "
                      "command has not: use the library from Blender (Kiln's Asset Libraries, Index Libraries), "
                      "or export its assets as .glb for the command line", file=sys.stderr)
            empty = empty or not len(index)
    except (MeshError, ModelError) as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    return 2 if empty else 0


def search_command(args: argparse.Namespace) -> int:
    """The assets nearest the prompt in indexed libraries, as JSON: what --reference can name."""
    import torch

    from .embed import ClipEmbedder
    from .retrieve import search_libraries

    try:
        request = JobRequest.from_fields({"task": protocol.TASK_SEARCH, "prompt": args.prompt,
                                          "libraries": args.library})
        clip = ClipEmbedder.load(args.clip, args.offline, torch.device("cpu")) if args.clip else None
        hits = search_libraries(request, args.count, clip)
    except (JobError, MeshError, ModelError) as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([{"file": str(h.file), "caption": h.entry.caption, "score": round(h.score, 4)} for h in hits],
                     indent=2))
    return 0


def add_job_arguments(parser: argparse.ArgumentParser, presets: dict[str, dict]) -> None:
    """The options texturing and generating share."""
    parser.add_argument("--prompt", required=True, help="what the result should show")
    parser.add_argument("--negative", default="", help="negative prompt: what it should avoid")
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (built-in, offline pipeline check), a Hugging Face id, a diffusers folder, "
                             "or a .safetensors file")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same settings: same result (default 0)")
    parser.add_argument("--size", type=int, default=1024,
                        help=f"texture size, {protocol.MIN_TEXTURE_SIZE}-{protocol.MAX_TEXTURE_SIZE}")
    parser.add_argument("--steps", type=int, default=None, help="iterations (default: the preset's)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the preset's)")
    parser.add_argument("--method", type=str.lower, choices=METHODS, default="sir",
                        help="sir: few-step iterative reconstruction (default); sds / ssd: score distillation")
    parser.add_argument("--lora", default=None,
                        help="a LoRA (HF id, folder or .safetensors) fused into the model; an LCM-LoRA such as "
                             "latent-consistency/lcm-lora-sdv1-5 makes SD a 4-step model")
    parser.add_argument("--lora-weight", type=float, default=1.0,
                        help=f"how much of the LoRA is fused: 1 as trained (default), less to soften it, negative "
                             f"to push away from it ({protocol.MIN_LORA_WEIGHT:g} to {protocol.MAX_LORA_WEIGHT:g})")
    parser.add_argument("--vae", default=None,
                        help="an autoencoder in place of the model's (HF id, folder or .safetensors): "
                             "madebyollin/taesd (SD 1.x/2.x) encodes and decodes views several times faster, "
                             "with slightly softer detail")
    parser.add_argument("--preset", type=str.lower, choices=sorted({p for names in presets.values() for p in names}),
                        default=None,
                        help="default: pipeline-check for the tiny model, lcm/turbo for few-step models "
                             "(LCM, LCM-LoRA, SD-Turbo), quality otherwise")
    parser.add_argument("--offline", action="store_true", help="never contact the model hub")
    parser.add_argument("--low-vram", action="store_true",
                        help="bound GPU memory for 6 GB cards: two images per UNet call, one per VAE call")
    parser.add_argument("--reference", action="append", default=None,
                        help="an asset file (GLB/OBJ/PLY) to use as a reference (ReDream); repeatable, the first "
                             "is warmed up toward")
    parser.add_argument("--library", action="append", default=None,
                        help="an indexed asset folder to retrieve references from by prompt (repeatable)")
    parser.add_argument("--clip", default=None, help="CLIP weights (HF id or folder): re-rank and face by picture")
    parser.add_argument("--adapt", action="store_true",
                        help="adapt the model to the references first: a LoRA on their views (cached)")
    parser.add_argument("--delta-denoising", action="store_true",
                        help="SDS/SSD: subtract the model's residual on the reference's views every few steps")
    parser.add_argument("--out", required=True, help="output folder")


class VersionAction(argparse.Action):
    """--version, with the versions looked up only when asked for: argparse's own action wants
    its text when the parser is built, which would cost every command (``serve`` included, which
    Blender waits on) a lookup."""

    def __init__(self, option_strings: list[str], dest: str, **_: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print Kiln's, Python's, torch's and diffusers' "
                         "versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from . import __version__
        from .server import software_versions

        print(f"Kiln {__version__} ({software_versions()})")
        parser.exit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description=__doc__)
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server Blender connects to (secret on stdin)")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port (reported on stdout)")
    serve.add_argument("--connection-file", nargs="?", const=str(protocol.default_connection_file()), default=None,
                       help="run standing, outside Blender: write the port and a fresh secret to this file "
                            f"(default {protocol.default_connection_file()}) for Kiln's 'Connect to a Running "
                            "Backend' preference; keeps models loaded across Blender sessions; Ctrl+C stops it")
    tex = sub.add_parser("texture", help="texture a mesh file from a prompt, without Blender")
    tex.add_argument("mesh", help=f"a {', '.join(MESH_SUFFIXES[:-1])} or {MESH_SUFFIXES[-1]} file")
    add_job_arguments(tex, PRESETS)
    tex.add_argument("--controlnet", default=None,
                     help="a depth ControlNet (HF id, folder or .safetensors) so views follow the mesh's shape")
    tex.add_argument("--controlnet-weight", type=float, default=1.0,
                     help="how strongly the ControlNet steers the views: 1 as trained (default), 0 not at all "
                          f"(up to {protocol.MAX_CONTROLNET_WEIGHT:g})")
    tex.add_argument("--refine", action="store_true",
                     help="start from the mesh's existing texture (or --init-texture) instead of blank")
    tex.add_argument("--init-texture", default=None,
                     help="PNG/JPEG to refine (implies --refine), mapped through the mesh's UVs; a name with "
                     "<UDIM> (paint.<UDIM>.png) reads each UDIM tile's file for the faces in that tile")
    tex.add_argument("--strength", type=float, default=None,
                     help="refine only: 0.05 keeps nearly all of the texture, 1 repaints freely (default 0.5)")
    tex.add_argument("--repaint-mask", default=None,
                     help="PNG in the texture's UV layout (implies --refine): only faces whose UV centre lies on "
                     "white change, the others keep their texels")
    tex.add_argument("--up", choices=protocol.UP_AXES, default="y", help="the file's up axis (glTF/OBJ: y)")
    index = sub.add_parser("index", help="index asset folders (captions, thumbnails, embeddings) for retrieval")
    index.add_argument("folders", nargs="+", help="folders of GLB/glTF/OBJ/PLY assets")
    index.add_argument("--clip", default=None, help="CLIP weights (HF id or folder) for image embeddings")
    index.add_argument("--offline", action="store_true", help="never contact the model hub")
    find = sub.add_parser("search", help="the assets nearest a prompt in indexed libraries (JSON)")
    find.add_argument("--prompt", required=True)
    find.add_argument("--library", action="append", required=True, help="an indexed asset folder (repeatable)")
    find.add_argument("--count", type=count_of_hits, default=6, help="how many assets to list (default 6)")
    find.add_argument("--clip", default=None, help="CLIP weights (HF id or folder): re-rank by picture")
    find.add_argument("--offline", action="store_true", help="never contact the model hub")
    gen = sub.add_parser("generate", help="generate a textured object from a prompt (GLB + PNG), without Blender")
    add_job_arguments(gen, GENERATE_PRESETS)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .server import serve as run_server
        return run_server(args.port, Path(args.connection_file).expanduser() if args.connection_file else None)
    commands = {"index": index_command, "search": search_command, "generate": generate_command,
                "texture": texture_command}

    def terminated(signum: int, _frame: object) -> None:
        """A render farm's or a shell's kill: leave as Ctrl+C does, through the job's clean-up (the
        unwrapping child and its folder of the mesh), which Python's default skips."""
        print(f"kiln: {args.command} stopped ({signal.Signals(signum).name})", file=sys.stderr)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:  # Ctrl+C: the shell's exit status for it, without a page of torch's frames
        print(f"kiln: {args.command} interrupted (Ctrl+C)", file=sys.stderr)
        return 130
