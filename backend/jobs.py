"""Jobs: a validated request, and the functions the server and the CLI both run (texturing a
mesh, generating an object)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from . import protocol
from .assets import Asset
from .events import TextureEvents
from .mesh import Mesh, MeshError
from .mesh_file import MESH_SUFFIXES, missing_texture, unread_format
from .presets import (
    GENERATE_PRESETS,
    METHODS,
    DistillConfig,
    GenerateConfig,
    SIRConfig,
    default_preset,
    resolve,
    resolve_generate,
)
from .gpu import gpu_problem, no_kernel_fix
from .prior import (LatentDiffusionPrior, Prior, check_names, first_download, load_prior, readable_tokens,
                    set_low_vram, unread_words)
from .texture import SlotTextures, shared_uv_area
from .tiles import pack_tiles
from .unwrap import Unwrapping


T = TypeVar("T")


class JobError(Exception):
    """A job that cannot run as asked; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's out-of-memory error, or a library's that wraps it (the words are all they share)."""
    return "out of memory" in f"{type(exc).__name__}: {exc}".lower()


def describe_failure(exc: BaseException, low_vram: bool) -> dict[str, str]:
    """An unexpected exception as an error code and a message with the fix where one is known. Out
    of GPU memory, the first fix is Low VRAM mode unless the job already had it."""
    text = f"{type(exc).__name__}: {exc}"
    if is_out_of_memory(exc):
        fixes = "choose a smaller texture size, close other GPU programs, or press Unload Models and try again"
        if not low_vram:
            fixes = ("turn on Low VRAM (Preferences > Add-ons > Kiln; --low-vram in the CLI and batch scripts), "
                     f"or {fixes}")
        return {"code": protocol.E_OUT_OF_MEMORY,
                "message": f"the GPU ran out of memory{' even in Low VRAM mode' if low_vram else ''}: {fixes} "
                           f"({text[:200]})"}
    if fix := no_kernel_fix(text):
        return {"code": protocol.E_JOB_FAILED, "message": f"the job failed: {fix} ({text[:200]})"}
    return {"code": protocol.E_JOB_FAILED, "message": f"the job failed: {text[:500]}"}


@dataclass(frozen=True)
class JobRequest:
    prompt: str
    task: str = protocol.TASK_TEXTURE
    negative_prompt: str = ""
    model: str = "tiny"
    seed: int = 0
    texture_size: int = 1024
    steps: int | None = None        # SIR iterations; None keeps the preset's
    guidance: float | None = None   # None keeps the preset's
    method: str = "sir"
    preset: str | None = None
    offline: bool = False
    strength: float = 0.5           # refine mode only: how far the result may move from the texture
    controlnet: str | None = None   # a depth ControlNet to condition the prior on the mesh's shape
    lora: str | None = None         # a LoRA fused into the model (e.g. an LCM-LoRA: few-step SD)
    lora_weight: float = 1.0        # how much of it (``protocol.MIN_LORA_WEIGHT`` to ``MAX_LORA_WEIGHT``)
    controlnet_weight: float = 1.0  # how strongly the ControlNet steers (no reload to change it)
    vae: str | None = None          # an autoencoder in place of the model's (TAESD: faster views)
    low_vram: bool = False          # bound the model's memory for small cards (prior.set_low_vram)
    # ReDream: use the artist's ``references`` (asset files, primary first), or else the assets the
    # prompt retrieves from the indexed ``libraries``; ``clip`` (weights) re-ranks and faces by
    # picture. The primary reference warms the result up; ``adapt_prior`` also trains a LoRA of the
    # prior on views of every reference; ``delta_denoising`` subtracts the prior's residual on the
    # primary reference's views (SDS/SSD).
    references: tuple[str, ...] = ()
    libraries: tuple[str, ...] = ()
    clip: str | None = None
    adapt_prior: bool = False
    delta_denoising: bool = False

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> "JobRequest":
        """Validate a request from the wire or the CLI; each problem gets its own message."""
        def bad(msg: str) -> JobError:
            return JobError(protocol.E_BAD_REQUEST, msg)

        task = f.get("task") or protocol.TASK_TEXTURE
        tasks = (protocol.TASK_TEXTURE, protocol.TASK_GENERATE, protocol.TASK_INDEX, protocol.TASK_SEARCH)
        if task not in tasks:
            raise bad(f"unknown task {task!r}: one of {', '.join(map(repr, tasks))}")
        prompt = f.get("prompt") or ""
        if task != protocol.TASK_INDEX and (not isinstance(prompt, str) or not prompt.strip()):
            raise bad("the prompt is empty: type " + {protocol.TASK_GENERATE: "what the object should be, e.g. 'a "
                      "wooden chair'", protocol.TASK_SEARCH: "what to find references for, e.g. 'a chair'"}.get(
                          task, "what the texture should show, e.g. 'weathered bronze'"))
        size = f.get("texture_size", 1024)
        if not isinstance(size, int) or not protocol.MIN_TEXTURE_SIZE <= size <= protocol.MAX_TEXTURE_SIZE:
            raise bad(f"texture size {size!r} is out of range: choose {protocol.MIN_TEXTURE_SIZE} to "
                      f"{protocol.MAX_TEXTURE_SIZE} pixels")
        steps = f.get("steps")
        if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= protocol.MAX_STEPS):
            raise bad(f"steps {steps!r} is out of range: choose 1 to {protocol.MAX_STEPS}")
        guidance = f.get("guidance")
        if guidance is not None and (not isinstance(guidance, (int, float))
                                     or not 0 <= guidance <= protocol.MAX_GUIDANCE):
            raise bad(f"guidance {guidance!r} is out of range: choose 0 to {protocol.MAX_GUIDANCE:g}")
        seed = f.get("seed", 0)
        if not isinstance(seed, int) or not 0 <= seed <= protocol.MAX_SEED:
            raise bad(f"seed {seed!r} is out of range: choose a whole number from 0 to {protocol.MAX_SEED}")
        strength = f.get("strength", 0.5)
        if not isinstance(strength, (int, float)) or not protocol.MIN_STRENGTH <= strength <= protocol.MAX_STRENGTH:
            raise bad(f"strength {strength!r} is out of range: choose {protocol.MIN_STRENGTH:g} (keep nearly all) to "
                      f"{protocol.MAX_STRENGTH:g} (repaint)")
        def weight(part: str, name: str, low: float, high: float) -> float:
            """A model part's weight: in range, and given only with that part."""
            value = f.get(f"{part}_weight", 1.0)
            if not isinstance(value, (int, float)) or not low <= value <= high:
                raise bad(f"{name} weight {value!r} is out of range: choose {low:g} to {high:g} (1: as trained)")
            if value != 1.0 and not f.get(part):
                raise bad(f"a {name} weight was given without a {name}: choose the {name} too (--{part} in the "
                          "CLI), or leave the weight at 1")
            return float(value)

        lora_weight = weight("lora", "LoRA", protocol.MIN_LORA_WEIGHT, protocol.MAX_LORA_WEIGHT)
        controlnet_weight = weight("controlnet", "ControlNet", protocol.MIN_CONTROLNET_WEIGHT,
                                   protocol.MAX_CONTROLNET_WEIGHT)
        method = f.get("method") or "sir"
        if method not in METHODS:
            raise bad(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        model = f.get("model") or "tiny"
        if not isinstance(model, str):
            raise bad("model must be a name, folder or file path")
        preset = f.get("preset") or None
        if preset is not None and not isinstance(preset, str):
            raise bad(f"preset {preset!r} must be a preset's name, e.g. 'quality'")
        libraries, references = f.get("libraries") or (), f.get("references") or ()
        for name, value in (("libraries", libraries), ("references", references)):
            if not isinstance(value, (list, tuple)) or not all(isinstance(x, str) and x for x in value):
                raise bad(f"{name} must be a list of paths")
        if task in (protocol.TASK_INDEX, protocol.TASK_SEARCH) and not libraries:
            raise bad("no asset library to search: add your asset folders (Preferences > Add-ons > Kiln; --library "
                      "in the CLI)")
        return cls(prompt=prompt.strip(), task=task, negative_prompt=str(f.get("negative_prompt") or ""), model=model,
                   seed=seed, texture_size=size, steps=steps,
                   guidance=None if guidance is None else float(guidance), method=method, strength=float(strength),
                   controlnet=str(f["controlnet"]) if f.get("controlnet") else None,
                   lora=str(f["lora"]) if f.get("lora") else None, lora_weight=lora_weight,
                   controlnet_weight=controlnet_weight,
                   vae=str(f["vae"]) if f.get("vae") else None,
                   low_vram=bool(f.get("low_vram", False)),
                   preset=preset, offline=bool(f.get("offline", False)),
                   references=tuple(references), libraries=tuple(libraries),
                   clip=str(f["clip"]) if f.get("clip") else None, adapt_prior=bool(f.get("adapt_prior", False)),
                   delta_denoising=bool(f.get("delta_denoising", False)))

    @property
    def lora_label(self) -> str | None:
        """The LoRA as it changes the model: its name, with its weight where that is not 1."""
        if self.lora is None:
            return None
        return self.lora if self.lora_weight == 1.0 else f"{self.lora} × {self.lora_weight:g}"

    def config(self, refine: bool = False, few_step: str | None = None) -> SIRConfig | DistillConfig:
        """The method's schedule: the named preset, else the default for this model (``few_step``:
        the loaded prior's kind), with the request's overrides."""
        try:
            return resolve(self.method, self.preset or default_preset(self.method, self.model, refine, few_step),
                           self._overrides())
        except ValueError as exc:
            raise JobError(protocol.E_BAD_REQUEST, str(exc)) from None

    def generate_config(self, few_step: str | None = None) -> GenerateConfig:
        try:
            preset = self.preset or default_preset(self.method, self.model, few_step=few_step,
                                                   table=GENERATE_PRESETS)
            cfg = resolve_generate(self.method, preset, self._overrides())
        except ValueError as exc:
            raise JobError(protocol.E_BAD_REQUEST, str(exc)) from None
        return replace(cfg, mesh=replace(cfg.mesh, texture_size=self.texture_size))

    def _overrides(self) -> dict[str, Any]:
        return {"iterations": self.steps, "guidance": self.guidance}


@dataclass
class ModelCache:
    """Loaded priors stay in memory between jobs (loading SD takes seconds); Unload frees them."""

    priors: dict[tuple[str, str | None, str | None, str | None], Prior] = field(default_factory=dict)
    #: The model loading now, and whether Unload was pressed meanwhile (it then serves its job only).
    loading: str | None = None
    dropped: bool = False

    def get(self, request: JobRequest, events: TextureEvents) -> Prior:
        """The request's model (with its ControlNet, LoRA and VAE), loaded once; low-VRAM mode and
        the ControlNet's weight are set on the loaded model, so changing them costs no reload."""
        key = (request.model, request.controlnet, request.lora_label, request.vae)
        prior = self.priors.get(key)  # read once: Unload may clear the cache from another thread at any time
        if prior is None:
            # Refused while the loaded model stays for the next job.
            check_names(request.model, request.controlnet, request.lora, request.vae)
            fetched = [part for part in (request.model, request.controlnet, request.lora, request.vae)
                       if part and first_download(part, request.offline)]
            events.progress(0, 1, f"downloading {' and '.join(fetched)} (first use: gigabytes, which takes minutes)"
                            if fetched else f"loading model {request.model}")
            self.priors.clear()  # one model resident at a time keeps VRAM bounded
            self.loading, self.dropped = request.model, False
            events.loading(request.model)
            try:
                prior = load_prior(request.model, offline=request.offline, controlnet=request.controlnet,
                                   lora=request.lora, lora_weight=request.lora_weight, vae=request.vae)
            finally:
                self.loading = None
                events.loading(None)
            if not self.dropped:
                self.priors[key] = prior
        if isinstance(prior, LatentDiffusionPrior):
            set_low_vram(prior, request.low_vram)
            prior.conditioning_scale = request.controlnet_weight
        if not prior.pipeline_check and (problem := gpu_problem()):
            events.log(problem)
        if prior.pipeline_check:
            events.log("PIPELINE CHECK: the built-in tiny model has random weights; "
                       f"this {'object' if request.task == protocol.TASK_GENERATE else 'texture'} tests the "
                       "pipeline and is not art")
        for what, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
            if unread := unread_words(getattr(prior, "tokenizer", None), text):
                events.log(f"the {what} is longer than {request.model}'s text encoder reads "
                           f"({readable_tokens(prior.tokenizer)} tokens), so it ignores its end, "
                           f"'{unread}': shorten it, or put what matters first")
        if getattr(prior, "few_step", None) and not request.preset:
            events.log(f"{request.model} is a few-step ({prior.few_step}) model: using its "
                       f"'{prior.few_step}' schedule where {request.method.upper()} has one")
        return prior

    def unload(self) -> list[str]:
        names = [model + "".join(f" + {extra}" for extra in extras if extra) for model, *extras in self.priors]
        self.priors.clear()
        if self.loading is not None:  # pressed mid-load: the model was kept once loaded, VRAM and all
            self.dropped = True
            names.append(f"{self.loading} (loading now: freed when its job ends)")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return names


def mesh_from_message(msg: protocol.Message, prefix: str = "") -> Mesh:
    """Build the job's mesh (or, with ``protocol.REFERENCE_PREFIX``, the artist's reference object)
    from a SUBMIT message's arrays and fields, rejecting malformed input clearly."""
    a = {name[len(prefix):]: blob for name, blob in msg.arrays.items() if name.startswith(prefix)}
    for name in ("positions", "triangles"):
        if name not in a:
            raise MeshError(f"the job carries no {prefix + name!r} array")

    def arr(name: str, dtype: Any, width: tuple[int, ...]) -> np.ndarray:
        blob = a[name]
        out = np.frombuffer(blob.data, dtype=np.dtype(blob.dtype))
        try:
            return out.reshape(-1, *width).astype(dtype, copy=False)
        except ValueError:
            raise MeshError(f"array {prefix + name!r} of shape {blob.shape} is not "
                            f"(N, {', '.join(map(str, width))})") from None

    tri_loops = arr("tri_loops", np.int64, (3,)) if "tri_loops" in a else None
    corner_uvs = None
    if "loop_uvs" in a and tri_loops is not None:
        loop_uvs = arr("loop_uvs", np.float32, (2,))
        if tri_loops.size and (tri_loops.min() < 0 or tri_loops.max() >= len(loop_uvs)):
            raise MeshError("loop indices out of range of the UV array")
        corner_uvs = loop_uvs[tri_loops]
    paint = None
    if protocol.PAINT_TRIANGLES in a:
        blob = a[protocol.PAINT_TRIANGLES]
        if blob.dtype != "|u1" or len(blob.shape) != 1:
            raise MeshError(f"{protocol.PAINT_TRIANGLES} must be (T,) uint8, got {blob.shape} {blob.dtype}")
        paint = np.frombuffer(blob.data, np.uint8).astype(bool)
    loop_count = msg.get(prefix + "loop_count", 0)
    if not isinstance(loop_count, int) or isinstance(loop_count, bool) or loop_count < 0:
        raise MeshError(f"{prefix}loop_count {loop_count!r} must be a whole number ≥ 0 (the mesh's face corners)")
    return Mesh(positions=arr("positions", np.float32, (3,)), triangles=arr("triangles", np.int64, (3,)),
                corner_uvs=corner_uvs, tri_loops=tri_loops, loop_count=loop_count, paint=paint,
                up_axis=str(msg.get(prefix + "up_axis", "z")), name=str(msg.get(prefix + "object", "mesh")))


def texture_from_message(msg: protocol.Message, name: str = "init_texture") -> torch.Tensor | None:
    """The existing texture a refine job starts from (or the reference object's, by ``name``):
    (H, W, 4) RGBA8 rows bottom-up on the wire, (3, H, W) floats in [0, 1] here."""
    blob = msg.arrays.get(name)
    if blob is None:
        return None
    if blob.dtype != "|u1" or len(blob.shape) != 3 or blob.shape[2] != 4 or min(blob.shape[:2]) < 1:
        raise JobError(protocol.E_BAD_REQUEST, f"{name} must be (H, W, 4) uint8, got {blob.shape} {blob.dtype}")
    rgba = np.frombuffer(blob.data, np.uint8).reshape(blob.shape)
    return torch.from_numpy(rgba[..., :3].astype(np.float32) / 255).permute(2, 0, 1)


def slot_textures_from_message(msg: protocol.Message, mesh: Mesh, prefix: str = "",
                               base: torch.Tensor | None = None) -> SlotTextures | None:
    """What each material slot of an object shows, when its slots differ ("slot_sources" and
    "triangle_slots" behind ``prefix``; ``protocol`` describes them), with ``base``, the first
    slot's image, if it has one; None when the message carries no slot sources."""
    sources = msg.get(prefix + "slot_sources")
    if sources is None:
        return None

    def bad(what: str) -> JobError:
        return JobError(protocol.E_BAD_REQUEST, f"{prefix}slot_sources: {what}")

    blob = msg.arrays.get(prefix + "triangle_slots")
    if not isinstance(sources, list) or blob is None or blob.dtype != "<i4" or blob.shape != (len(mesh.triangles),):
        raise bad(f"needs a list and a (T,) <i4 '{prefix}triangle_slots' array for the mesh's {len(mesh.triangles)} "
                  "triangles")
    parsed: list[tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None] = []
    decoded: dict[str, torch.Tensor] = {}  # slots sharing an image or a UV map share its array
    for source in sources:
        if source is None:
            parsed.append(None)
        elif isinstance(source, dict) and isinstance(source.get("color"), list) and len(source["color"]) == 3 \
                and all(isinstance(c, (int, float)) for c in source["color"]):
            parsed.append(torch.tensor([float(c) for c in source["color"]]))
        elif isinstance(source, dict) and prefix + str(source.get("texture")) in msg.arrays:
            image, uv_name = prefix + source["texture"], prefix + str(source.get("uvs"))
            uvs = msg.arrays.get(uv_name)
            if uvs is None or uvs.dtype != "<f4" or uvs.shape != (mesh.loop_count, 2) or mesh.tri_loops is None:
                raise bad(f"{source.get('uvs')!r} must be the mesh's ({mesh.loop_count}, 2) <f4 loop UVs")
            if base is None or mesh.corner_uvs is None:
                raise bad("a slot's image needs the first image and the UV map it is read through")
            if image not in decoded:
                decoded[image] = texture_from_message(msg, image)
            if uv_name not in decoded:
                decoded[uv_name] = torch.from_numpy(np.frombuffer(uvs.data, np.float32).reshape(-1, 2)[mesh.tri_loops])
            parsed.append((decoded[image], decoded[uv_name]))
        else:
            raise bad(f"each slot's source is a color, a texture array with its UVs, or null, not {source!r}")
    slots = torch.from_numpy(np.frombuffer(blob.data, np.int32).astype(np.int64))
    corner_uvs = None if mesh.corner_uvs is None else torch.as_tensor(mesh.corner_uvs)
    return SlotTextures(base, corner_uvs, slots, parsed)


def init_texture_from_message(msg: protocol.Message, mesh: Mesh) -> torch.Tensor | SlotTextures | None:
    """The texture a refine job starts from: the first textured material's image, or, when the
    object's slots show different images or colours, every slot's own, to compose."""
    base = texture_from_message(msg)
    return None if base is None else slot_textures_from_message(msg, mesh, base=base) or base


def retrying_in_low_vram(request: JobRequest, events: TextureEvents, run: Callable[[JobRequest], T]) -> T:
    """``run(request)``; if the GPU runs out of memory outside Low VRAM mode, once more in it. That
    mode computes the same numbers in smaller batches, so a card a little too small for the job
    (SD 2.1 at 768² peaks at 11.8 GiB, 4.1 in Low VRAM) finishes it, slower, instead of failing.
    Out of memory there too, the job fails with the remaining fixes."""
    try:
        return run(request)
    except Exception as exc:
        if request.low_vram or not is_out_of_memory(exc):
            raise
    # Out of the except block, so the failed attempt's tensors, which its traceback held, are free.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    events.log("the GPU ran out of memory: running the job again in Low VRAM mode, slower (turn it on in "
               "Preferences > Add-ons > Kiln, or --low-vram, to start that way)")
    try:
        return run(replace(request, low_vram=True))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise JobError(protocol.E_OUT_OF_MEMORY, describe_failure(exc, low_vram=True)["message"]) from exc


def run_texture_job(request: JobRequest, mesh: Mesh, events: TextureEvents, models: ModelCache,
                    init_texture: torch.Tensor | SlotTextures | None = None,
                    own_reference: tuple[Asset, str] | None = None):
    """Validate, unwrap if needed (while the prior loads), run the method; returns the final (3, S, S)
    texture. With ``init_texture`` the method refines it instead of starting blank;
    ``own_reference`` is the artist's reference object (asset and name), if they chose one. Out of
    GPU memory, it runs again in Low VRAM mode (``retrying_in_low_vram``); the mesh keeps the UVs
    the first attempt gave it, which Blender already has."""
    mesh.validate()
    if mesh.corner_uvs is not None:  # once, not again when the job runs again in Low VRAM mode
        init_texture = lay_out_tiles(mesh, events, init_texture)
        warn_of_shared_texels(mesh, events)
    return retrying_in_low_vram(request, events, lambda request: _texture_job(request, mesh, events, models,
                                                                              init_texture, own_reference))


def _texture_job(request: JobRequest, mesh: Mesh, events: TextureEvents, models: ModelCache,
                 init_texture: torch.Tensor | SlotTextures | None, own_reference: tuple[Asset, str] | None):
    from .distill import DistillTexturer
    from .sir import SIRTexturer

    refine = init_texture is not None
    request.config(refine=refine)  # a bad preset or override fails before anything is loaded
    check_reference_options(request, own_reference is not None)
    if mesh.paint is not None and not refine:
        raise JobError(protocol.E_BAD_REQUEST, f"{mesh.name!r}: only some faces are to change, and the job carries "
                       "no texture for the others to keep: send its texture (Refine Existing Texture)")
    if refine and mesh.corner_uvs is None:
        raise JobError(protocol.E_BAD_REQUEST, f"{mesh.name!r} has a texture to refine but no UV map to read it "
                       "through: refining needs the UVs the texture was painted on")
    # xatlas starts in its child process now, and works while the model loads, references are
    # found and the method starts: SIR's first views, sampled from noise, need no UVs.
    with Unwrapping(mesh) if mesh.corner_uvs is None else contextlib.nullcontext() as unwrapping:
        prior = models.get(request, events)
        if isinstance(init_texture, SlotTextures):
            init_texture = init_texture.compose(prior.device)
        size = kept_texture_size(request, mesh, init_texture, events)
        cfg = request.config(refine, getattr(prior, "few_step", None))
        total = cfg.total_work(refine)  # the same total the method reports, so the bar never jumps
        reference, chosen = references_for(request, own_reference, mesh.positions, mesh.up_axis, prior, cfg, total,
                                           events)
        extra = {"delta_denoising": request.delta_denoising} if request.method != "sir" else {}
        with adaptation(request, prior, chosen, cfg, events, total):
            method = SIRTexturer if request.method == "sir" else DistillTexturer
            return method(mesh, prior, cfg, size, request.prompt, request.negative_prompt,
                          request.seed, events, init_texture=init_texture, strength=request.strength,
                          reference=reference, unwrapping=unwrapping, **extra).run()


def kept_texture_size(request: JobRequest, mesh: Mesh, init_texture: torch.Tensor | None,
                      events: TextureEvents) -> int:
    """The texture's size: the one asked for, except when only some faces change. The others'
    texels then come back as they were only at their image's own size, so a square image of a size
    Kiln makes keeps it (with a note when that is not the size asked for); any other image is
    resampled, which the note says too."""
    if mesh.paint is None or init_texture is None:
        return request.texture_size
    height, width = init_texture.shape[-2:]
    if height == width and protocol.MIN_TEXTURE_SIZE <= height <= protocol.MAX_TEXTURE_SIZE:
        if height != request.texture_size:
            events.log(f"{mesh.name!r}: Only Selected Faces keeps the other faces' texels as they are, so the "
                       f"texture stays at its image's own {height}² rather than the {request.texture_size}² asked for")
        return int(height)
    events.log(f"{mesh.name!r}: its image is {width}×{height}, which Kiln does not make (square, "
               f"{protocol.MIN_TEXTURE_SIZE}² to {protocol.MAX_TEXTURE_SIZE}²), so the other faces' texels are "
               f"resampled to {request.texture_size}², not kept as they were")
    return request.texture_size


def lay_out_tiles(mesh: Mesh, events: TextureEvents, init_texture: torch.Tensor | SlotTextures | None,
                  ) -> torch.Tensor | SlotTextures | None:
    """``pack_tiles``, telling the front end the tiles, so it can add the map that reads them there,
    and the artist why."""
    layout, init_texture = pack_tiles(mesh, init_texture)
    if layout is not None:
        events.tiles(layout.tiles.tolist())
        scale = protocol.tile_cell(0, len(layout.tiles))[0]
        events.log(f"{mesh.name!r}: its UV map lays faces out over {layout.describe()}, and Kiln makes one image, "
                   f"so it textures each tile in a cell of that image ({scale:.0%} of its width: a larger texture "
                   f"size gives each more texels), read through a new UV map ({protocol.TILES_UV_MAP!r} in Blender; "
                   "the CLI's .glb carries it as its UVs). Your UV map is left as it is")
    return init_texture


#: The share of a UV map's area on top of other faces' above which a job says so (below it, the
#: rasteriser's own error on slivers and island borders).
SHARED_UV_NOTE = 0.05


def warn_of_shared_texels(mesh: Mesh, events: TextureEvents) -> None:
    """Mirrored, stacked or tiled UV islands make faces share texels, which then take one blended
    colour: worth a note before the job, since the artist may have meant it (a mirrored half)."""
    shared = shared_uv_area(torch.as_tensor(mesh.corner_uvs))
    if shared > SHARED_UV_NOTE:
        events.log(f"{mesh.name!r}: {shared:.0%} of its UV map's area lies on top of other faces (mirrored, "
                   "stacked or tiled islands), so those faces share texels and get one blended colour there. For a "
                   "texture of their own, give the mesh a UV map without overlaps (in Blender: add a UV map, Smart "
                   "UV Project it and make it active for rendering) and texture again")


def check_reference_options(request: JobRequest, own_reference: bool) -> None:
    """ReDream's options need a reference, and delta denoising a distillation method: say so
    before anything loads, rather than silently doing less."""
    has_reference = own_reference or bool(request.references or request.libraries)
    for asked, what in ((request.adapt_prior, "Adapt Model"), (request.delta_denoising, "Delta Denoising")):
        if asked and not has_reference:
            raise JobError(protocol.E_BAD_REQUEST, f"{what} works from references, and this job has none: turn on "
                           "Use References (libraries, picked assets or a reference object; --reference or "
                           "--library in the CLI), or turn it off")
    if request.delta_denoising and request.method == "sir":
        raise JobError(protocol.E_BAD_REQUEST, "Delta Denoising corrects score distillation's gradient, which SIR "
                       "does not use: choose SDS or SSD, or turn Delta Denoising off")
    for file in request.references:
        path = Path(file)
        if path.is_dir():
            raise JobError(protocol.E_BAD_REQUEST, f"reference {file!r} is a folder: name one asset file in it, or "
                           "retrieve from it as an asset library (Preferences > Add-ons > Kiln; --library in the CLI)")
        if not path.is_file():
            raise JobError(protocol.E_BAD_REQUEST, f"reference {file!r} does not exist: name an asset file (GLB, OBJ, "
                           "PLY, ...) or pick one from Find References")
        if path.suffix.lower() == ".blend":
            raise JobError(protocol.E_BAD_REQUEST, f"reference {file!r} is a Blender file: export the asset as .glb "
                           "(File > Export > glTF 2.0), or put the file in an asset library folder, where Kiln's "
                           "add-on exports a .blend's marked assets")
        if path.suffix.lower() not in MESH_SUFFIXES:
            raise JobError(protocol.E_BAD_REQUEST, f"reference: {unread_format(path)}")
    for folder in request.libraries:
        if not Path(folder).is_dir():
            raise JobError(protocol.E_BAD_REQUEST, f"asset library {folder!r} is not a folder: fix or remove it "
                           "(Preferences > Add-ons > Kiln; --library in the CLI)")


def adaptation(request: JobRequest, prior: Prior, chosen: list, cfg: SIRConfig | DistillConfig,
               events: TextureEvents, total: int):
    """The prior adapted to the references for the job (``adapt.adapted``), if the request asks."""
    if not request.adapt_prior:
        return contextlib.nullcontext()
    from .adapt import adapted

    identity = " + ".join(x for x in (request.model, request.lora_label) if x)
    return adapted(prior, identity, chosen, cfg.adapt, cfg.background, request.seed, events, total)


def run_index_job(request: JobRequest, events: TextureEvents) -> list[str]:
    """Index each of the request's libraries; returns a line per library for the user. Files that
    cannot be read are reported (log) and skipped; only an unusable folder fails the job."""
    from .embed import ClipEmbedder, WordLlamaEmbedder
    from .events import Cancelled
    from .library import build_index
    from .gpu import default_device

    embedder = WordLlamaEmbedder()
    clip = ClipEmbedder.load(request.clip, request.offline, default_device()) if request.clip else None
    lines = []
    for n, folder in enumerate(request.libraries):
        def progress(done: int, total: int, what: str, n: int = n) -> None:
            events.progress(done, max(total, 1), f"library {n + 1}/{len(request.libraries)}: {what}")

        try:
            index, report = build_index(Path(folder), embedder, clip, progress, events.cancelled)
        except InterruptedError:
            raise Cancelled() from None
        except MeshError as exc:
            raise JobError(protocol.E_BAD_REQUEST, str(exc)) from None
        lines.append(report.summary(index, index.root.name))  # the panel is narrow; the folder is in Preferences
        events.log(lines[-1])
        for line in report.problems():
            events.log(line)
    return lines


def run_search_job(request: JobRequest, events: TextureEvents) -> int:
    """The assets nearest the prompt in the request's libraries, sent as one HITS message for the
    artist to pick from; returns how many."""
    from .embed import ClipEmbedder
    from .gpu import default_device
    from .retrieve import search_libraries

    events.progress(0, 1, "searching the asset libraries")
    clip = ClipEmbedder.load(request.clip, request.offline, default_device()) if request.clip else None
    try:
        hits = search_libraries(request, SEARCH_HITS, clip)
    except MeshError as exc:
        raise JobError(protocol.E_BAD_REQUEST, str(exc)) from None
    events.hits([{"file": str(h.file), "caption": h.entry.caption, "score": round(h.score, 4)} for h in hits],
                np.stack([h.thumbnails for h in hits]))
    events.progress(1, 1, f"found {len(hits)} assets")
    return len(hits)


#: How many hits a search shows the artist to pick from.
SEARCH_HITS = 6


def references_for(request: JobRequest, own: tuple[Asset, str] | None, positions: np.ndarray, up_axis: str,
                   prior: Prior, cfg: SIRConfig | DistillConfig, total: int, events: TextureEvents):
    """The job's references (``retrieve.choose``), and the primary one's views as the warm-up
    target, fitted to the bounding box of ``positions`` (the mesh being textured, or a generated
    object's frame) and faced forward: (None, []) when the job uses none."""
    from .embed import ClipEmbedder
    from .reference import ReferenceViews, choose_yaw, clip_facing, prior_facing
    from .retrieve import choose

    if own is None and not request.references and not request.libraries:
        return None, []
    if own is not None:
        own = (own[0].resolved(prior.device), own[1])
    clip = ClipEmbedder.load(request.clip, request.offline, prior.device) if request.clip else None
    events.progress(0, total, "finding references")
    try:
        chosen = choose(request, own, cfg.adapt.assets, clip)
    except MeshError as exc:
        raise JobError(protocol.E_BAD_REQUEST, str(exc)) from None
    for reference in chosen if own is None else []:
        if reference.asset.texture is None and (missing := missing_texture(Path(reference.label))) is not None:
            events.log(f"the reference {Path(reference.label).name} shows flat colours: {missing}")
        elif not reference.asset.coloured:
            events.log(f"the reference {Path(reference.label).name} has no colours of its own (no texture, vertex "
                       "colours or material), so Kiln sees it grey and pulls the first updates toward grey: pick a "
                       "coloured asset for colours, or use it for its shape alone")
    primary = chosen[0]
    name = Path(primary.label).name
    events.progress(0, total, f"facing reference {name}")
    score_fn = clip_facing(clip, request.prompt) if clip else prior_facing(prior, request.prompt,
                                                                            request.negative_prompt, request.seed)
    yaw = choose_yaw(primary.asset, positions, up_axis, score_fn, prior.resolution, cfg.background, prior.device)
    events.reference(primary.label, primary.score, yaw, primary.thumbnails)
    events.log(f"warming up toward {name} (score {primary.score:.2f}, turned {yaw:.0f}°)")
    return (ReferenceViews(primary.asset.placed(positions, up_axis, yaw), cfg.warmup, prior.resolution,
                           cfg.background), chosen)


#: A generated object's reference fills this fraction of the frame's radius (the Gaussians start in half).
REFERENCE_RADIUS = 0.8


def run_generate_job(request: JobRequest, events: TextureEvents, models: ModelCache,
                     own_reference: tuple[Asset, str] | None = None):
    """Load the prior and generate a new object; returns ``generate.Generated``.
    ``own_reference``: the artist's object to start from (asset and name), if they chose one. Out
    of GPU memory, it runs again in Low VRAM mode (``retrying_in_low_vram``)."""
    return retrying_in_low_vram(request, events, lambda request: _generate_job(request, events, models,
                                                                               own_reference))


def _generate_job(request: JobRequest, events: TextureEvents, models: ModelCache,
                  own_reference: tuple[Asset, str] | None):
    from .generate import FRAME_RADIUS, generate_object
    from .reference import frame_box

    request.generate_config()  # a bad preset or override fails before anything is loaded
    check_reference_options(request, own_reference is not None)
    if request.controlnet:
        raise JobError(protocol.E_BAD_REQUEST, "generating takes no depth ControlNet: there is no mesh to take "
                       "depth from yet. Clear the ControlNet field, or texture the generated object afterwards")
    prior = models.get(request, events)
    if getattr(prior, "wants_depth", False):
        raise JobError(protocol.E_BAD_REQUEST, f"{request.model} is a depth-conditioned model and needs a mesh: "
                       "generate with a text-to-image model (e.g. SD 1.5 / 2.1 / SD-Turbo)")
    cfg = request.generate_config(getattr(prior, "few_step", None))
    reference, chosen = references_for(request, own_reference, frame_box(REFERENCE_RADIUS * FRAME_RADIUS), "z",
                                       prior, cfg.schedule, cfg.total_work(), events)
    with adaptation(request, prior, chosen, cfg.schedule, events, cfg.total_work()):
        return generate_object(prior, cfg, request.prompt, request.negative_prompt, request.seed, events,
                               name=object_name(request.prompt), reference=reference,
                               delta_denoising=request.delta_denoising)


#: Names Windows reserves for devices, with any extension ("con.glb" cannot be written there).
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"{port}{n}" for port in ("com", "lpt") for n in range(1, 10))}
#: Bytes of a generated object's file name stem: file systems allow 255 for the whole name, and
#: a prompt's first words may be one long word (or a clause of CJK text, three bytes a letter).
_MAX_NAME_BYTES = 100


def object_name(prompt: str) -> str:
    """A file-safe object name ("a red chair, ornate" → "red_chair"), short enough for any file
    system and none of Windows' device names."""
    name = "_".join(w.lower() for w in protocol.prompt_words(prompt)) or "kiln_object"
    name = name.encode()[:_MAX_NAME_BYTES].decode(errors="ignore").rstrip("_")
    return f"{name}_object" if name in _WINDOWS_DEVICES else name
