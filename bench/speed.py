"""Where a texturing job's and a generation's time goes, per stage, for each method's preset.

    .venv/bin/python bench/speed.py --cpu-small          # here: tiny model, 5k faces, 512²/1024²
    python bench/speed.py                                # on a GPU: SD 1.5/2.1 architectures at full size

Compute time does not depend on the values of the weights, so on a GPU the priors are Stable
Diffusion 1.5's and 2.1's published architectures with random weights (nothing downloaded), in
fp16. Stages are timed by wrapping the functions that implement them (no instrumentation in the
product code); on CUDA every stage boundary synchronises so the times are the GPU's.

Per run: wall time per stage (UV unwrapping, prompt encoding, rendering, UNet, VAE,
reconstruction, in-painting/padding, conversion for transfer; "other" is chiefly SDS/SSD's backward
pass and Adam step), UNet calls and images denoised,
the share of time inside the UNet, peak VRAM (CUDA). Also the rasterisers and the 3D Gaussian
renderers alone (gsplat against its torch path), and generating an object end to end per method,
per stage. Prints a table, writes bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import CountingPrior  # noqa: E402

from backend import jobs, sir, texturing  # noqa: E402
from backend.cameras import orbit  # noqa: E402
from backend.events import TextureEvents  # noqa: E402
from backend.jobs import JobRequest, ModelCache  # noqa: E402
from backend.mesh import Mesh  # noqa: E402
from backend.prior import LatentDiffusionPrior, load_prior, set_low_vram  # noqa: E402
from backend.unwrap import Unwrapping, keep_spare  # noqa: E402

# Stable Diffusion's architectures from their published configs (weights do not change speed).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD2_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
# TAESD's published architecture (madebyollin/taesd, diffusers' AutoencoderTiny defaults) per level.
TAESD_BLOCKS = ((64, 1), (64, 3), (64, 3), (64, 3))
# CLIP ViT-L/14's text tower (SD 1.x) and OpenCLIP ViT-H/14's without its last layer (SD 2.x).
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
SD2_TEXT = dict(SD15_TEXT, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu")


@dataclass(frozen=True)
class Family:
    """A kind of model Kiln loads, as the bench rebuilds it: SD 1.x's or SD 2.x's networks at the
    family's native resolution, its depth conditioning, and the SIR schedule the product picks for it
    (``jobs.default_preset`` from the model's few-step kind)."""

    sd2: bool
    resolution: int
    depth: str | None = None      # "controlnet" (a depth ControlNet beside the UNet) or "channel" (SD 2 depth)
    few_step: str | None = None   # "turbo" or "lcm"


FAMILIES = {  # in the order a short lease should measure them: SD 2.1 at 768² costs the most
    "sd15": Family(sd2=False, resolution=512),
    "sd15-controlnet-depth": Family(sd2=False, resolution=512, depth="controlnet"),
    "sd2-depth": Family(sd2=True, resolution=512, depth="channel"),
    "sd-turbo": Family(sd2=True, resolution=512, few_step="turbo"),
    "sd15-lcm-lora": Family(sd2=False, resolution=512, few_step="lcm"),  # the LoRA is fused: SD 1.5's networks
    "sd21": Family(sd2=True, resolution=768),
}


def family_prior(name: str, device: torch.device, small: bool = False) -> LatentDiffusionPrior:
    """The family's prior with random weights: full size in fp16, built on ``device``; or, with
    ``small``, the tiny model changed the way the family differs from SD 1.5 (depth channel,
    ControlNet, few-step kind), so the CPU runs the same code paths. The tokenizer is the tiny
    model's: token ids do not change the text encoder's cost."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    family = FAMILIES[name]
    tiny = load_prior("tiny", device if small else torch.device("cpu"))
    if small:
        prior = tiny
        if family.depth == "channel":
            prior.unet = UNet2DConditionModel(**{**tiny.unet.config, "in_channels": 5}).to(device).eval()
    else:
        unet_config = dict(SD2_UNET if family.sd2 else SD15_UNET, sample_size=family.resolution // 8,
                           in_channels=5 if family.depth == "channel" else 4)
        with torch.device(device):  # random initialisation on the GPU: seconds, not a minute on the CPU
            unet = UNet2DConditionModel(**unet_config).half().eval()
            vae = AutoencoderKL(**SD_VAE).half().eval()
            encoder = CLIPTextModel(CLIPTextConfig(**(SD2_TEXT if family.sd2 else SD15_TEXT))).half().eval()
        prior = LatentDiffusionPrior(name, unet, vae, encoder, tiny.tokenizer,
                                     "v_prediction" if family.resolution == 768 else "epsilon", tiny.schedule,
                                     device, torch.float16)
    if family.depth == "controlnet":
        # The depth embedding's widths: diffusers' default for SD's 8× latents, three for the tiny model's 4×.
        channels = (16, 32, 96) if small else (16, 32, 96, 256)
        with torch.device(device):
            net = ControlNetModel.from_unet(prior.unet, conditioning_embedding_out_channels=channels)
        prior.controlnet = (net.half() if prior.dtype == torch.float16 else net).eval()
    prior.few_step = family.few_step
    return prior


def taesd_like(prior: LatentDiffusionPrior) -> Any:
    """TAESD with random weights at the prior's latent size: the published architecture for SD's
    four-level VAE, its first levels for the tiny model's three."""
    from diffusers import AutoencoderTiny

    widths, blocks = zip(*TAESD_BLOCKS[:len(prior.vae.config.block_out_channels)], strict=True)
    vae = AutoencoderTiny(encoder_block_out_channels=widths, decoder_block_out_channels=widths,
                          num_encoder_blocks=blocks, num_decoder_blocks=blocks[::-1])
    return vae.to(prior.device, prior.dtype).eval()


@contextlib.contextmanager
def vae_in_use(prior: LatentDiffusionPrior, taesd: bool) -> Iterator[str]:
    """The prior with TAESD in place of its own VAE inside the block when ``taesd`` (its own VAE
    back afterwards, whatever happens); yields the label a result row carries."""
    own = prior.vae
    if taesd:
        prior.vae = taesd_like(prior)
    try:
        yield "TAESD" if taesd else "model's"
    finally:
        prior.vae = own


def compile_prior(prior: LatentDiffusionPrior, mode: str) -> None:
    """torch.compile the UNet and the VAE's halves in place (``mode``: torch.compile's; its
    "reduce-overhead" adds CUDA graphs). The first timestep and batch size compile static, the
    next ones recompile once with those sizes dynamic (4 compilations in a SIR job), so the bench
    runs an untimed warm-up job first."""
    prior.unet = torch.compile(prior.unet, mode=mode)
    prior.vae.encoder = torch.compile(prior.vae.encoder, mode=mode)
    prior.vae.decoder = torch.compile(prior.vae.decoder, mode=mode)


class StageClock:
    """Accumulates wall time per stage; synchronises CUDA at each boundary so GPU work is counted
    where it happens."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        self.stack.append(name)
        try:
            yield
        finally:
            self.sync()
            self.stack.pop()
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            if self.stack:  # nested: report time in the inner stage only
                self.seconds[self.stack[-1]] -= elapsed

    def wrap(self, owner: Any, attribute: str, name: str) -> Callable[[], None]:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return original(*args, **kwargs)
        setattr(owner, attribute, timed)
        return lambda: setattr(owner, attribute, original)


TORUS_SECTIONS = {5_000: (100, 25), 50_000: (250, 100), 500_000: (1000, 250)}  # 2·major·minor faces


def torus_mesh(faces: int, rough: bool = False) -> Mesh:
    """A torus of exactly ``faces`` triangles, no UVs (genus one: xatlas must cut it twice). ``rough``
    jitters every vertex by 15 % of the mean edge length, seeded, like a scan or a sculpt's noise:
    the case that makes unwrappers slow."""
    import trimesh

    major, minor = TORUS_SECTIONS[faces]
    m = trimesh.creation.torus(1.0, 0.35, major_sections=major, minor_sections=minor)
    positions = np.asarray(m.vertices, np.float32)
    if rough:
        edge = float(np.mean(m.edges_unique_length))
        positions = positions + np.random.default_rng(0).normal(0, 0.15 * edge, positions.shape).astype(np.float32)
    return Mesh(positions, np.asarray(m.faces, np.int64), None, up_axis="y",
                name=f"{'rough ' if rough else ''}torus{len(m.faces)}")


def run_job(prior: Any, method: str, preset: str, faces: int, size: int, device: torch.device,
            low_vram: bool = False, plain: bool = False) -> dict[str, Any]:
    """One texturing job on a torus without UVs, timed per stage. With ``plain`` the job runs again
    without the stage clock, for its own wall time (``seconds_plain``): on CUDA the clock drains
    the GPU's queue at every stage boundary, twice per texture update in SIR's reconstruction,
    which the job itself never does."""
    clock = StageClock(device)
    set_low_vram(prior, low_vram)
    counts = {"unet_calls": 0, "images": 0}
    restore: list[Callable[[], None]] = []
    original_eps = prior.predict_eps

    def counted_eps(x_t, t, prompt, views, branches="both"):
        counts["unet_calls"] += 1
        counts["images"] += x_t.shape[0] * (2 if branches == "both" else 1)
        with clock.stage("UNet"):
            return original_eps(x_t, t, prompt, views, branches)
    prior.predict_eps = counted_eps
    restore.append(lambda: setattr(prior, "predict_eps", original_eps))
    restore += [clock.wrap(prior, "encode_prompt", "prompt encoding"), clock.wrap(prior, "encode", "VAE"),
                clock.wrap(prior, "decode", "VAE"),
                clock.wrap(Unwrapping, "__init__", "UV unwrap"), clock.wrap(Unwrapping, "apply", "UV unwrap"),
                clock.wrap(texturing, "rasterize_views", "rendering"),
                clock.wrap(texturing, "depth_maps", "rendering"),
                clock.wrap(texturing.MeshTexturer, "render", "rendering"),
                clock.wrap(sir.SIRTexturer, "_reconstruct", "reconstruction"),
                clock.wrap(texturing, "inpaint", "in-painting + padding"),
                clock.wrap(texturing, "pad_islands", "in-painting + padding"),
                clock.wrap(texturing, "uv_coverage", "in-painting + padding"),
                clock.wrap(texturing, "to_rgba8", "conversion for transfer")]
    models = ModelCache()
    models.priors[("bench", None)] = prior
    models.get = lambda *_args, **_kw: prior
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    request = JobRequest.from_fields({"prompt": "a weathered bronze statue", "model": "bench",
                                          "method": method, "preset": preset, "texture_size": size})
    mesh = torus_mesh(faces)
    start = time.perf_counter()
    try:
        with clock.stage("other"):
            jobs.run_texture_job(request, mesh, TextureEvents(), models)
    finally:
        for undo in restore:
            undo()
        set_low_vram(prior, False)
    total = time.perf_counter() - start
    stages = {k: round(v, 3) for k, v in sorted(clock.seconds.items(), key=lambda kv: -kv[1])}
    row = {"method": method, "preset": preset, "low_vram": low_vram, "faces": mesh.triangle_count, "texture": size,
           "seconds": round(total, 3), "unet_calls": counts["unet_calls"], "images_denoised": counts["images"],
           "unet_share": round(clock.seconds["UNet"] / total, 3), "stages": stages,
           "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}
    if plain:
        set_low_vram(prior, low_vram)
        mesh = torus_mesh(faces)
        try:
            clock.sync()
            start = time.perf_counter()
            jobs.run_texture_job(request, mesh, TextureEvents(), models)
            clock.sync()
            row["seconds_plain"] = round(time.perf_counter() - start, 3)
        finally:
            set_low_vram(prior, False)
    return row


def mean_seconds(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds per call of ``run`` after one untimed call (warm-up, JIT builds), with the GPU's
    queue drained before and after: the mean of three calls on a GPU, where one takes milliseconds
    and launch jitter shows; one call on the CPU, where it takes seconds."""
    repeats = 3 if device.type == "cuda" else 1
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def rasteriser_times(device: torch.device, faces_list: list[int], size: int) -> list[dict[str, Any]]:
    out = []
    for faces in faces_list:
        mesh = torus_mesh(faces)
        cams = orbit(mesh.positions, [0.0, 90.0, 180.0, 270.0], [20.0, -10.0, 45.0, 0.0], "y", device=device)
        positions, tris = torch.as_tensor(mesh.positions, device=device), torch.as_tensor(mesh.triangles, device=device)
        backends = ["torch"] + (["nvdiffrast"] if device.type == "cuda" else [])
        for backend in backends:
            from backend.raster import rasterize
            clip = torch.cat([positions, torch.ones_like(positions[:, :1])], 1) @ cams.mvp.transpose(1, 2)
            seconds = mean_seconds(lambda: rasterize(clip, tris, size, size, backend=backend), device)
            out.append({"rasteriser": backend, "faces": mesh.triangle_count, "views": 4, "size": size,
                        "ms": round(seconds * 1000, 1)})
    return out


def unwrap_times(faces_list: list[int], one_piece_up_to: int) -> list[dict[str, Any]]:
    """UV unwrapping alone, smooth and rough, on this machine's CPU cores (it never uses the GPU):
    Kiln's way (xatlas in a child process, in pieces above 20k faces), with the child started for
    the job and, up to 50k faces, with the backend's spare started ahead (``keep_spare``); and, as the before for
    meshes it splits, xatlas on the whole mesh in one piece, up to ``one_piece_up_to`` faces
    (stopped after 120 s)."""
    import os

    from backend import unwrap as unwrapping
    from backend.mesh import MeshError

    out = []
    for faces in faces_list:
        for rough in (False, True):
            split = faces > unwrapping.SINGLE_PIECE_FACES
            # The spare saves the child's start, a second at most: worth a row where the unwrap is short.
            ways = [("kiln", False)] + ([("kiln", True)] if faces <= 50_000 else []) \
                + ([("one", False)] if split and faces <= one_piece_up_to else [])
            for pieces, spare in ways:
                mesh = torus_mesh(faces, rough)
                single = unwrapping.SINGLE_PIECE_FACES
                if pieces == "one":
                    unwrapping.SINGLE_PIECE_FACES = faces
                if spare:
                    unwrapping.keep_spare()
                    time.sleep(2)  # a backend between jobs: the spare has started
                else:
                    unwrapping.discard_spare()
                start = time.perf_counter()
                try:
                    count = len(unwrapping.mesh_pieces(mesh))
                    unwrapping.unwrap(mesh, time_limit=600 if pieces == "kiln" else 120)
                    used = round(float(np.abs(mesh.uv_areas()).sum() / 2), 3)
                except MeshError as error:  # stopped at the limit, or xatlas crashed
                    used = "timed out" if "took over" in str(error) else "crashed"
                finally:
                    unwrapping.SINGLE_PIECE_FACES = single
                out.append({"faces": faces, "surface": "rough" if rough else "smooth", "pieces": count,
                            "child": "spare" if spare else "started for the job",
                            "seconds": round(time.perf_counter() - start, 2), "uv_area_used": used,
                            "cpu_cores": os.cpu_count()})
    unwrapping.discard_spare()
    return out


def generate_times(prior: Any, runs: list[tuple[str, str, bool]], device: torch.device) -> list[dict[str, Any]]:
    """Generation end to end per method and preset, with the model's VAE or TAESD: seconds per
    stage (Gaussians, extraction, unwrap, bake, refinement), extraction's own steps, images
    denoised, peak VRAM. Only extraction's steps are clocked: they end in a copy to the CPU
    anyway, so the clock adds no wait the job does not have."""
    from backend import meshing
    from backend.generate import generate_object
    from backend.presets import GENERATE_PRESETS

    rows = []
    for method, preset, taesd in runs:
        counting = CountingPrior(prior)
        clock = StageClock(device)
        restore = [clock.wrap(meshing, "density_grid", "density grid"), clock.wrap(meshing, "hidden", "fill"),
                   clock.wrap(meshing, "surface", "marching cubes"), clock.wrap(meshing, "clean", "clean-up")]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            with vae_in_use(prior, taesd) as vae:
                result = generate_object(counting, GENERATE_PRESETS[method][preset], "a wooden stool", "", 0,
                                         TextureEvents())
        finally:
            for undo in restore:
                undo()
        rows.append({"method": method, "preset": preset, "vae": vae,
                     "seconds": round(time.perf_counter() - start, 2),
                     "stages": result.seconds, "extraction": {k: round(v, 3) for k, v in clock.seconds.items()},
                     "images_denoised": counting.images,
                     "gaussians": len(result.splats["means"]), "triangles": result.mesh.triangle_count,
                     "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                     if device.type == "cuda" else None})
    return rows


def splat_times(device: torch.device, counts: list[int], size: int) -> list[dict[str, Any]]:
    """3D Gaussian rendering alone, forward and backward, 4 views: gsplat (CUDA) against the torch path."""
    import os

    from backend import splat
    from backend.cameras import orbit_sphere

    cams = orbit_sphere(np.zeros(3), 1.0, [0.0, 90.0, 180.0, 270.0], [20.0, -10.0, 45.0, 0.0], "z", device=device)
    out = []
    for count in counts:
        params = splat.sphere(count, 0.5, torch.Generator().manual_seed(0), device)
        for backend in (["gsplat", "torch"] if device.type == "cuda" else ["torch"]):
            os.environ["KILN_SPLAT"] = backend

            def once(params: torch.nn.ParameterDict = params) -> None:
                splat.render(params, cams, size, 1.0).images.sum().backward()
            out.append({"renderer": backend, "gaussians": count, "views": 4, "size": size,
                        "ms_forward_backward": round(mean_seconds(once, device) * 1000, 1)})
        os.environ.pop("KILN_SPLAT", None)
    return out


def vae_times(device: torch.device, views: int, size: int, compile_mode: str | None = None) -> list[dict[str, Any]]:
    """The VAE alone: encoding and decoding ``views`` images (one SIR pass's), SD's VAE against
    TAESD, both at full size with random weights, fp16 on CUDA. With ``compile_mode``, SD's VAE
    once more under torch.compile: its first call (the compilation) and how far its decoding
    strays from the eager one's."""
    from diffusers import AutoencoderKL

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sd = LatentDiffusionPrior("sd", None, AutoencoderKL(**SD_VAE).to(device, dtype).eval(), None, None, "epsilon",
                              None, device, dtype)
    images = torch.rand(views, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))

    def timed(name: str) -> dict[str, Any]:
        with torch.no_grad():
            encode = mean_seconds(lambda: sd.encode(images), device)
            decode = mean_seconds(lambda latents=sd.encode(images): sd.decode(latents), device)
        return {"vae": name, "views": views, "size": size, "encode_ms": round(encode * 1000, 1),
                "decode_ms": round(decode * 1000, 1),
                "parameters_m": round(sum(p.numel() for p in sd.vae.parameters()) / 1e6, 2)}

    eager = sd.vae
    out = [timed("SD")]
    sd.vae = taesd_like(sd)
    out.append(timed("TAESD"))
    sd.vae = eager
    if compile_mode:
        with torch.no_grad():
            latents = sd.encode(images)
            reference = sd.decode(latents)
            eager.encoder, eager.decoder = (torch.compile(m, mode=compile_mode) for m in (eager.encoder, eager.decoder))
            started = time.perf_counter()
            difference = float((sd.decode(latents) - reference).abs().max())
            sd.encode(images)
            if device.type == "cuda":
                torch.cuda.synchronize()
            first_call = time.perf_counter() - started
        out.append({**timed(f"SD, torch.compile {compile_mode}"), "compile_seconds": round(first_call, 1),
                    "decode_max_difference": difference})
    return out


def set_channels_last(prior: LatentDiffusionPrior, on: bool) -> None:
    """The convolutional networks' weights NHWC (``torch.channels_last``) or NCHW, as the layout
    part weighs them: tensor cores compute convolutions in NHWC, and GroupNorm between them may
    take the gain back (it did on an H100 and an H200, so the product keeps NCHW)."""
    layout = torch.channels_last if on else torch.contiguous_format
    for net in (prior.unet, prior.vae, prior.controlnet):
        if net is not None:
            net.to(memory_format=layout)


CONV_SETTINGS = (("NCHW", False), ("NHWC", False), ("NCHW", True))  # (weights' layout, cuDNN autotuning)


def layout_times(prior: LatentDiffusionPrior, device: torch.device, preset: str, faces: int, size: int,
                 views: int, view_size: int) -> list[dict[str, Any]]:
    """The UNet (a CFG pair of ``views``), the VAE and one whole job (``preset``, unclocked) under
    each of ``CONV_SETTINGS`` in one run: whether NHWC weights or cuDNN's autotuning
    (``torch.backends.cudnn.benchmark``, which tries each convolution's algorithms at every new
    shape) pays on this device."""
    images = torch.rand(views, 3, view_size, view_size, device=device,
                        generator=torch.Generator(device).manual_seed(0))
    out = []
    with torch.no_grad():
        prompt = prior.encode_prompt("a weathered bronze statue", "")
        latents = prior.encode(images)
    autotuning = torch.backends.cudnn.benchmark
    for layout, autotune in CONV_SETTINGS:
        set_channels_last(prior, layout == "NHWC")
        torch.backends.cudnn.benchmark = autotune
        try:
            with torch.no_grad():
                unet = mean_seconds(lambda: prior.predict_eps(latents, 500, prompt, None), device)
                encode = mean_seconds(lambda: prior.encode(images), device)
                decode = mean_seconds(lambda: prior.decode(latents), device)
            # Only CUDA's clock drains a queue: on the CPU the clocked run is the job's own time.
            job = run_job(prior, "sir", preset, faces, size, device, plain=device.type == "cuda")
        finally:
            set_channels_last(prior, False)
            torch.backends.cudnn.benchmark = autotuning
        out.append({"layout": layout, "cudnn_autotune": autotune, "views": views, "view_size": view_size,
                    "unet_ms": round(unet * 1000, 1), "encode_ms": round(encode * 1000, 1),
                    "decode_ms": round(decode * 1000, 1), "preset": preset, "faces": job["faces"], "texture": size,
                    "job_seconds": job.get("seconds_plain", job["seconds"])})
    return out


CONSUMER_CARD_GIB = 8  # the issues' bound for the texturing default; above it a family is timed in low-VRAM mode too


def family_times(device: torch.device, name: str, faces: int, size: int, small: bool = False) -> list[dict[str, Any]]:
    """One model family's default texturing job (SIR with the schedule the product picks for it) on
    a fresh prior: seconds, images denoised, peak VRAM and the weights' part of it; again in
    low-VRAM mode if the peak passes a consumer card's memory, to say whether that mode fits."""
    import gc

    from backend.presets import default_preset

    prior = family_prior(name, device, small)
    nets = [m for m in (prior.unet, prior.vae, prior.text_encoder, prior.controlnet) if m is not None]
    weights = sum(p.numel() * p.element_size() for net in nets for p in net.parameters())
    preset = default_preset("sir", name, few_step=prior.few_step)
    if small and preset == "quality":
        preset = "pipeline-check"  # the tiny model's toy sizes
    rows = []
    for low_vram in (False, True):
        row = run_job(prior, "sir", preset, faces, size, device, low_vram)
        rows.append({"family": name, "resolution": prior.resolution, "depth": FAMILIES[name].depth,
                     "weights_gib": round(weights / 2**30, 2), **row})
        print(f"  {name:<22} {preset + (' low-VRAM' if low_vram else ''):<18} {prior.resolution:>4}²  "
              f"{row['seconds']:7.2f} s  {row['images_denoised']:>5} images  UNet {row['unet_share']:.0%}  "
              f"weights {weights / 2**30:5.2f} GiB  peak VRAM {row['peak_vram_gib']}", flush=True)
        if (row["peak_vram_gib"] or 0) <= CONSUMER_CARD_GIB:
            break
    del prior, nets
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def profile_job(prior: Any, preset: str, faces: int, size: int, device: torch.device) -> None:
    """torch.profiler over one SIR job (after the timed runs, so nothing is cold): the operators
    that cost most device time, and the job's total, to say where the time outside the UNet goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_job(prior, "sir", preset, faces, size, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
    print(f"\nprofile of sir {preset}, {faces} faces, {size}² (sorted by {key}):\n{table}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed_profile.txt").write_text(table)


def target_lines(rows: list[dict[str, Any]], generated: list[dict[str, Any]], faces: int, size: int) -> list[str]:
    """Issue 6's targets against this run's rows (the unclocked time where there is one), so a
    lease's log answers them directly."""
    def seconds(row: dict[str, Any]) -> float:
        return row.get("seconds_plain", row["seconds"])

    def verdict(value: float, bound: float) -> str:
        return "met" if value <= bound else f"missed by {value / bound - 1:.0%}"

    lines = []
    for preset, bound in (("turbo", 3.0), ("quality", 10.0)):
        for row in (r for r in rows if r["method"] == "sir" and r["preset"] == preset and not r["low_vram"]
                    and (r["faces"], r["texture"]) == (faces, size)):
            lines.append(f"SIR {preset}, {row['vae']} VAE, {faces} faces, {size}²: {seconds(row):.2f} s, target ≤ "
                         f"{bound:g} s: {verdict(seconds(row), bound)}")
            if preset == "quality" and row["vae"] == "model's":
                lines.append(f"  UNet share {row['unet_share']:.0%} (target ≥ 80 %); peak VRAM "
                             f"{row['peak_vram_gib']} GiB (target ≤ 8)")
    for row in (r for r in rows if r["low_vram"] and r["peak_vram_gib"] is not None):
        lines.append(f"SIR {row['preset']} low-VRAM: peak VRAM {row['peak_vram_gib']} GiB, target ≤ 6: "
                     f"{verdict(row['peak_vram_gib'], 6.0)}")
    for row in generated:
        vram = f", peak VRAM {row['peak_vram_gib']} GiB (target ≤ 12)" if row["peak_vram_gib"] is not None else ""
        lines.append(f"generate, {row['method']} {row['preset']}, {row['vae']} VAE: {row['seconds']:.2f} s, target ≤ "
                     f"15 s: {verdict(row['seconds'], 15.0)}{vram}")
    return lines


PARTS = ("jobs", "models", "vae", "layout", "unwrap", "raster", "splat", "generate")


def attempt(failures: list[str], what: str, run: Callable[[], Any]) -> Any:
    """Run one measurement; a failure is printed with its traceback and recorded, and the bench goes
    on to the next (one broken path must not cost a GPU lease the rest) but exits non-zero."""
    import traceback

    try:
        return run()
    except Exception as error:  # noqa: BLE001 - reported in full and makes the run fail
        traceback.print_exc()
        failures.append(f"{what}: {type(error).__name__}: {error}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-small", action="store_true", help="tiny model, small meshes and textures, CPU")
    parser.add_argument("--model", choices=list(FAMILIES), default="sd15",
                        help="GPU runs: which architecture the other parts use")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="the models part: comma-separated families, each timed on the default job")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--faces", help="comma-separated face counts of the job grid (5000, 50000, 500000)")
    parser.add_argument("--sizes", help="comma-separated texture sizes of the job grid")
    parser.add_argument("--methods", default="sir,sds,ssd", help="comma-separated methods of the job grid")
    parser.add_argument("--no-low-vram", action="store_true", help="leave out the low-VRAM row")
    parser.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile the UNet and VAE in this mode; an untimed warm-up job compiles first "
                             "(the vae part adds a compiled row of SD's VAE)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the default job (SIR quality) and print its costliest operators")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    families = args.families.split(",")
    if set(families) - set(FAMILIES):
        parser.error(f"--families: unknown {sorted(set(families) - set(FAMILIES))}; choose from {', '.join(FAMILIES)}")
    device = torch.device("cpu" if args.cpu_small or not torch.cuda.is_available() else "cuda")
    if args.cpu_small:
        faces_list, sizes, presets = [5_000], [512, 1024], "pipeline-check"
    else:
        faces_list, sizes, presets = [5_000, 50_000, 500_000], [1024, 2048, 4096], None
    faces_list = [int(f) for f in args.faces.split(",")] if args.faces else faces_list
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sizes
    # The default job: the 50k faces at 2048² on a GPU, the smallest grid point here.
    default_faces, default_size = faces_list[min(1, len(faces_list) - 1)], sizes[min(1, len(sizes) - 1)]
    failures: list[str] = []
    family_rows = []
    keep_spare()  # as the backend server does: each job finds xatlas's child already started
    if "models" in parts:  # first, while the GPU holds no other model, so each peak is the family's own
        print("each model family's default job:")
        for name in families:
            family_rows += attempt(failures, f"family {name}", lambda name=name: family_times(
                device, name, default_faces, default_size, args.cpu_small)) or []
    prior = None
    if parts & {"jobs", "generate", "layout"} or args.profile:
        prior = load_prior("tiny", device) if args.cpu_small else family_prior(args.model, device)
    methods = args.methods.split(",")

    def presets_of(method: str) -> list[str]:
        return [presets] if presets else ["quality", "turbo"] if method == "sir" else ["quality"]
    plan = []
    for method in methods:
        for preset in presets_of(method):
            # SDS/SSD's quality runs take minutes of UNet time each on a GPU; mesh and texture size
            # change only their rendering, which SIR's grid measures, so they run the default job alone.
            grid = [(f, s) for f in faces_list for s in sizes] if presets or method == "sir" \
                else [(default_faces, default_size)]
            plan += [(method, preset, f, s, False, False) for f, s in grid]
    if "sir" in methods:  # the default job with TAESD in place of the model's VAE
        plan += [("sir", preset, default_faces, default_size, False, True) for preset in presets_of("sir")]
    if "sir" in methods and not args.no_low_vram:
        plan.append(("sir", presets or "quality", default_faces, default_size, True, False))  # low-VRAM mode
    if args.compile and prior is not None:
        compile_prior(prior, args.compile)
        for preset in presets_of("sir"):  # every shape the SIR jobs feed the networks
            started = time.perf_counter()
            attempt(failures, f"compile warm-up ({preset})",
                    lambda: run_job(prior, "sir", preset, default_faces, default_size, device))
            print(f"torch.compile ({args.compile}) warm-up, sir {preset}: {time.perf_counter() - started:.1f} s",
                  flush=True)
    rows, vaes, layouts, unwraps, rasters, splats, generated = [], [], [], [], [], [], []
    first_job = None
    if "jobs" in parts:  # untimed warm-up, as a backend's first job: kernels load, cuBLAS starts
        started = time.perf_counter()
        if attempt(failures, "first job", lambda: run_job(prior, "sir", presets or "turbo", default_faces,
                                                          default_size, device)) is not None:
            first_job = round(time.perf_counter() - started, 2)
            print(f"first job after loading (sir {presets or 'turbo'}, warm-up, untimed below): {first_job} s",
                  flush=True)
    for method, preset, faces, size, low_vram, taesd in plan if "jobs" in parts else []:
        label = preset + (" low-VRAM" if low_vram else "") + (" TAESD" if taesd else "")
        # The targets' jobs also run without the stage clock on CUDA (where it costs time); SDS/SSD
        # take minutes there, so only SIR's; low-VRAM mode has a memory target, not a time.
        plain = device.type == "cuda" and method == "sir" and (faces, size) == (default_faces, default_size) \
            and not low_vram
        with vae_in_use(prior, taesd) as vae:
            row = attempt(failures, f"{method} {label} {faces} faces {size}²",
                          lambda: run_job(prior, method, preset, faces, size, device, low_vram, plain))
        if row is None:
            continue
        rows.append({**row, "vae": vae})
        print(f"{method:<4} {label:<24} {row['faces']:>7} faces {size:>5}²  "
              f"{row['seconds']:7.2f} s ({row.get('seconds_plain', '-')} s unclocked)  "
              f"UNet {row['unet_share']:.0%}  {row['unet_calls']:>4} calls  "
              f"{row['images_denoised']:>5} images  VRAM {row['peak_vram_gib']}  "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["stages"].items() if v >= 0.005), flush=True)
    if args.profile:
        attempt(failures, "profile", lambda: profile_job(prior, presets or "quality", default_faces, default_size,
                                                          device))
    if "vae" in parts:
        vaes = attempt(failures, "VAE", lambda: vae_times(device, *((1, 128) if args.cpu_small else (8, 512)),
                                                          args.compile)) or []
        print("\nVAE alone (one pass's views, encode and decode):")
        for r in vaes:
            compiled = f"  (compiling {r['compile_seconds']} s, decoding differs by up to " \
                f"{r['decode_max_difference']:.1e})" if "compile_seconds" in r else ""
            print(f"  {r['vae']:<6} {r['parameters_m']:6.2f} M parameters  {r['views']} x {r['size']}²  "
                  f"encode {r['encode_ms']:8.1f} ms  decode {r['decode_ms']:8.1f} ms{compiled}", flush=True)
    if "layout" in parts:
        layouts = attempt(failures, "layout", lambda: layout_times(
            prior, device, presets or "turbo", default_faces, default_size, 2 if args.cpu_small else 6,
            prior.resolution)) or []
        print("\nconvolution settings: UNet (a CFG pair), VAE, a whole job (unclocked):")
        for r in layouts:
            setting = r["layout"] + (" cuDNN autotuned" if r["cudnn_autotune"] else "")
            print(f"  {setting:<20}  UNet {r['unet_ms']:7.1f} ms  encode {r['encode_ms']:7.1f} ms  decode "
                  f"{r['decode_ms']:7.1f} ms  ({r['views']} x {r['view_size']}²)  sir {r['preset']} {r['faces']} "
                  f"faces {r['texture']}²: {r['job_seconds']:.2f} s", flush=True)
    if "unwrap" in parts:
        # The one-piece comparison is a CPU question, answered by the CPU run; a GPU lease skips it.
        unwraps = attempt(failures, "unwrap", lambda: unwrap_times(
            faces_list if args.faces else [5_000, 50_000, 500_000], 50_000 if args.cpu_small else 0)) or []
        print("\nUV unwrapping alone (CPU):")
        for r in unwraps:
            used = r["uv_area_used"]
            print(f"  {r['faces']:>7} faces {r['surface']:<6} {r['pieces']:>5} pieces  {r['child']:<20} "
                  f"{r['seconds']:7.2f} s  "
                  f"UV area used {used if isinstance(used, str) else f'{used:.0%}'}  ({r['cpu_cores']} cores)",
                  flush=True)
        keep_spare()  # for generation, after the rows without one
    if "raster" in parts:
        rasters = attempt(failures, "rasterisers", lambda: rasteriser_times(device, faces_list, 512)) or []
        print("\nrasteriser alone (4 views):")
        for r in rasters:
            print(f"  {r['rasteriser']:<10} {r['faces']:>7} faces {r['size']}²  {r['ms']:8.1f} ms")
    if "splat" in parts:
        splats = attempt(failures, "3D Gaussians", lambda: splat_times(
            device, [2_000] if args.cpu_small else [10_000, 100_000], 128 if args.cpu_small else 512)) or []
        print("\n3D Gaussians alone (4 views, forward + backward):")
        for r in splats:
            print(f"  {r['renderer']:<10} {r['gaussians']:>7} Gaussians {r['size']}²  "
                  f"{r['ms_forward_backward']:8.1f} ms")
    if "generate" in parts:
        generated = attempt(failures, "generation", lambda: generate_times(
            prior, [(m, p, False) for m in methods if m in ("sir", "sds") for p in presets_of(m)]
            + [("sir", p, True) for p in presets_of("sir") if "sir" in methods], device)) or []
        print("\ngenerate an object:")
        for r in generated:
            label = r["preset"] + (" TAESD" if r["vae"] == "TAESD" else "")
            print(f"  {r['method']:<4} {label:<21} {r['seconds']:7.2f} s  {r['images_denoised']:>5} images  "
                  f"{r['gaussians']} Gaussians  {r['triangles']} triangles  VRAM {r['peak_vram_gib']}  "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()) + " (extraction: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in r["extraction"].items()) + ")", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    (RESULTS / "speed.json").write_text(json.dumps({"device": device_name, "date": time.strftime("%Y-%m-%d"),
                                                "model": "tiny" if args.cpu_small else args.model,
                                                "compile": args.compile,
                                                "first_job_seconds": first_job, "jobs": rows,
                                                "models": family_rows, "vae": vaes, "layout": layouts,
                                                "unwrap": unwraps,
                                                "rasterisers": rasters,
                                                "splats": splats, "generate": generated, "failures": failures},
                                               indent=2))
    lines = [] if args.cpu_small else target_lines(rows, generated, default_faces, default_size)
    if lines:  # the targets are for full-size models, not the tiny one
        print("\nTargets (issue 6; this run, " + device_name + "):\n  " + "\n  ".join(lines))
    print(f"\nwrote {RESULTS / 'speed.json'} ({device_name})")
    if failures:
        sys.exit("speed bench: " + str(len(failures)) + " measurement(s) failed:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
