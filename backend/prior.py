"""Priors: the one interface every method uses, and Stable Diffusion / the tiny model behind it.

A method never sees a UNet. It asks a ``Prior`` for ε-predictions of noisy images at a timestep,
unconditional and conditional as a pair (CFG, SDS and SSD each combine them their own way), given
prompt embeddings and per-view conditioning (cameras, and depth maps for priors that use them).
Anything that implements ``Prior`` — the exact prior, or one written outside the project — plugs
into every method unchanged.

Loading accepts a Hugging Face id, a local diffusers folder or a single ``.safetensors``
checkpoint, and turns the many ways that fails into one message that says what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from . import protocol
from .cameras import Cameras, view_suffix
from .diffusion import NoiseSchedule
from .gpu import default_device

# At diffusers' import, transformers warns that its image processors want torchvision and fall back
# to PIL ones, and says to install it: Kiln needs none (SD runs without its safety checker, CLIP
# reads pictures through the PIL processor), and every real job's log sent artists after it.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)

TINY = "tiny"
UNCOND, COND, BOTH = "uncond", "cond", "both"
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(Exception):
    """A model that cannot be loaded; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Views:
    """Per-view conditioning for a batch of K images; a prior uses what it needs."""

    cameras: Cameras
    depth: torch.Tensor | None = None     # (K, 1, H, W), top row first, 0 where empty


class Prior(Protocol):
    name: str
    device: torch.device
    schedule: NoiseSchedule
    resolution: int          # the image size (pixels) the prior works at
    pipeline_check: bool     # True: results check the pipeline and are not art
    #: True for text-to-image priors that know nothing of cameras: methods then add
    #: view-dependent suffixes ("front view", ...) to the prompt of each view.
    wants_view_prompts: bool

    def encode_prompt(self, prompt: str, negative: str) -> Any:
        """Whatever ``predict_eps`` needs to know the prompt and the negative prompt by."""

    def stack_prompts(self, prompts: list[Any]) -> Any:
        """One prompt object for a batch of views from one ``encode_prompt`` result per view."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(K, 3, H, W) images in [0, 1] → the space the diffusion runs in; differentiable."""

    # Optional: ``latent_shape(images)``, the shape ``encode(images)`` would return. A sampler that
    # starts from pure noise needs only that, and a prior without it is asked to encode instead
    # (``latent_shape`` below).

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``encode``, to images in [0, 1]."""

    def predict_eps(self, x_t: torch.Tensor, t: int, prompt: Any, views: Views | None, branches: str = "both"
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(ε_uncond, ε_cond) for noisy x_t at timestep t; ``branches`` 'uncond' or 'cond' computes
        only that one (DDIM inversion needs no prompt, guidance-free models no negative) and
        returns None for the other."""


def latent_shape(prior: Prior, images: torch.Tensor) -> torch.Size:
    """The shape of ``prior.encode(images)`` without an encoder pass where the prior can say it
    (a VAE encode of K views costs as much as a few UNet calls); plug-ins without
    ``latent_shape`` still work, at one encode's cost."""
    if hasattr(prior, "latent_shape"):
        return prior.latent_shape(images)
    with torch.no_grad():
        return prior.encode(images).shape


VIEW_SUFFIXES = ("front view", "side view", "back view", "overhead view")


def view_prompt(prompt: str, suffix: str, tokenizer: Any = None) -> str:
    """DreamFusion's view-dependent prompt; LoRA adaptation captions its training views the same way.
    With the text encoder's ``tokenizer``, a prompt too long for it is cut so that the suffix is
    still read: CLIP reads 77 tokens, and cutting the whole text dropped the suffix, giving every
    view the same prompt (the Janus problem back)."""
    if tokenizer is not None:
        room = readable_tokens(tokenizer) - len(_tokens(tokenizer, f", {suffix}"))
        tokens = _tokens(tokenizer, prompt)
        if len(tokens) > room:
            prompt = tokenizer.decode(tokens[:room])
    return f"{prompt}, {suffix}"


def unread_words(tokenizer: Any, text: str) -> str:
    """The end of ``text`` past what a text encoder with this ``tokenizer`` reads; "" if it reads
    it all (or there is no tokenizer to tell)."""
    if tokenizer is None:
        return ""
    tokens, room = _tokens(tokenizer, text), readable_tokens(tokenizer)
    return tokenizer.decode(tokens[room:]) if len(tokens) > room else ""


def readable_tokens(tokenizer: Any) -> int:
    """How many of a text's tokens its encoder reads: its length, less the start and end tokens."""
    return tokenizer.model_max_length - 2


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


class Prompts:
    """A prompt encoded once per job, with DreamFusion's view-dependent variants for priors that
    want them; every method asks it for the prompt of a batch of views."""

    def __init__(self, prior: Prior, prompt: str, negative: str) -> None:
        self.prior = prior
        self.plain = prior.encode_prompt(prompt, negative)
        tokenizer = getattr(prior, "tokenizer", None)
        self.per_view = {suffix: prior.encode_prompt(view_prompt(prompt, suffix, tokenizer), negative)
                         for suffix in VIEW_SUFFIXES} if getattr(prior, "wants_view_prompts", False) else {}

    def for_views(self, cams: Cameras) -> Any:
        """Per view with a view-dependent suffix for text-only priors, else the plain prompt."""
        if not self.per_view:
            return self.plain
        return self.prior.stack_prompts([self.per_view[view_suffix(a, e)]
                                         for a, e in zip(cams.azimuths, cams.elevations, strict=True)])


@dataclass
class LatentDiffusionPrior:
    """Stable Diffusion (and the tiny model): a UNet in the latent space of a VAE."""

    name: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    prediction_type: str
    schedule: NoiseSchedule
    device: torch.device
    dtype: torch.dtype
    pipeline_check: bool = False
    controlnet: Any = None          # a depth ControlNet, if the user chose one
    conditioning_scale: float = 1.0  # the ControlNet's weight (``protocol.MAX_CONTROLNET_WEIGHT``)
    wants_view_prompts: bool = True
    few_step: str | None = None     # "lcm" or "turbo": a distilled few-step model with its own SIR preset
    batch_limit: int | None = None  # low-VRAM mode: at most this many images per UNet call (``set_low_vram``)
    #: LCM-distilled UNets (``time_cond_proj_dim`` set) take the guidance scale as an embedding
    #: rather than as a CFG pair; this is the scale they get (diffusers' LCM pipeline default).
    embedded_guidance: float = 8.5

    @property
    def wants_depth(self) -> bool:
        """A depth ControlNet, or SD 2's depth-to-image UNet (latents + a depth channel)."""
        return self.controlnet is not None or self.unet.config.in_channels == 5

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.latent_factor

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative: str) -> torch.Tensor:
        """Embeddings (2, L, D): the negative (unconditional) prompt first, then the prompt."""
        tokens = self.tokenizer([negative, prompt], padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.device))[0].to(self.dtype)

    def stack_prompts(self, prompts: list[torch.Tensor]) -> torch.Tensor:
        """(2, K, L, D): negative and prompt embeddings per view."""
        return torch.stack(prompts, 1)

    def latent_shape(self, images: torch.Tensor) -> torch.Size:
        k, _, h, w = images.shape
        return torch.Size((k, self.vae.config.latent_channels, h // self.latent_factor, w // self.latent_factor))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode((images * 2 - 1).to(self.dtype))
        # AutoencoderKL gives a distribution (its mean is the latent); TAESD gives the latents.
        latents = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(x.to(self.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def predict_eps(self, x_t: torch.Tensor, t: int, prompt: torch.Tensor, views: Views | None,
                    branches: str = BOTH) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One UNet call for the branches asked for (the CFG pair as one batch of 2K);
        v-prediction models are converted to ε."""
        k = x_t.shape[0]
        rows = [i for i, name in enumerate((UNCOND, COND)) if branches in (name, BOTH)]
        x = torch.cat([x_t] * len(rows)).to(self.dtype)
        per_view = prompt.dim() == 4  # stacked view-dependent prompts
        embeds = torch.cat([prompt[i] if per_view else prompt[i:i + 1].expand(k, -1, -1) for i in rows])
        depth = None
        if self.wants_depth:
            if views is None or views.depth is None:
                raise ValueError(f"{self.name} is depth-conditioned: the method must render depth maps")
            depth = torch.cat([views.depth] * len(rows)).to(self.device, self.dtype)
        step = self.batch_limit or len(x)
        out = torch.cat([self._unet(x[i:i + step], t, embeds[i:i + step], None if depth is None else depth[i:i + step])
                         for i in range(0, len(x), step)])
        if self.prediction_type == "v_prediction":
            a, s = self.schedule.coefficients(t)
            out = a * out + s * x.float()
        parts = dict(zip(rows, out.chunk(len(rows)), strict=True))
        return parts.get(0), parts.get(1)


    def _unet(self, x: torch.Tensor, t: int, embeds: torch.Tensor, depth: torch.Tensor | None) -> torch.Tensor:
        """The UNet (with its depth conditioning and LCM guidance embedding) on one batch."""
        unet_input, extra = x, {}
        if depth is not None:
            if self.unet.config.in_channels == 5:  # SD 2 depth: depth in [-1, 1] at latent size
                small = torch.nn.functional.interpolate(depth, size=x.shape[-2:], mode="bicubic", align_corners=False)
                unet_input = torch.cat([x, small * 2 - 1], 1)
            if self.controlnet is not None:
                down, mid = self.controlnet(x, t, encoder_hidden_states=embeds,
                                            controlnet_cond=depth.expand(-1, 3, -1, -1),
                                            conditioning_scale=self.conditioning_scale, return_dict=False)
                extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        cond_dim = getattr(self.unet.config, "time_cond_proj_dim", None)
        if cond_dim:
            from diffusers.models.embeddings import get_timestep_embedding

            w = torch.full((len(x),), (self.embedded_guidance - 1) * 1000.0, device=self.device)
            extra["timestep_cond"] = get_timestep_embedding(w, cond_dim, flip_sin_to_cos=False,
                                                            downscale_freq_shift=1).to(self.dtype)
        return self.unet(unet_input, t, encoder_hidden_states=embeds, **extra).sample.float()


#: Low-VRAM mode's UNet batch: two images at a time (one CFG pair).
LOW_VRAM_BATCH = 2


def set_low_vram(prior: LatentDiffusionPrior, on: bool) -> None:
    """Bound activation memory for small cards: the views (and the CFG pair) go through the UNet
    ``LOW_VRAM_BATCH`` images at a time, and the VAE encodes and decodes one image at a time
    (diffusers' VAE slicing). Same results, a little slower. Attention needs no slicing: torch 2's
    scaled-dot-product attention, which diffusers uses by default, is already memory-efficient."""
    prior.batch_limit = LOW_VRAM_BATCH if on else None
    if on:
        prior.vae.enable_slicing()
    else:
        prior.vae.disable_slicing()


def load_prior(model: str, device: torch.device | None = None, offline: bool = False,
               controlnet: str | None = None, lora: str | None = None, vae: str | None = None,
               lora_weight: float = 1.0) -> Prior:
    """``model``: 'tiny', a Hugging Face id, a diffusers folder, a single checkpoint file, or
    ``python:MODULE:FUNCTION`` (a prior written outside Kiln, see ``load_plugin``);
    ``controlnet``: optionally a depth ControlNet given the same ways; ``lora``: optionally a LoRA
    (an LCM-LoRA makes SD a few-step model) given the same ways, fused into the weights at
    ``lora_weight``; ``vae``:
    optionally an autoencoder in place of the model's (``_load_vae``). Low-VRAM mode is switched
    on a loaded prior (``set_low_vram``), so toggling it costs no reload."""
    offline = hub_offline(offline)
    with kept_off_the_hub(offline):
        return _load_prior(model, device or default_device(), offline, controlnet, lora, vae, lora_weight)


def _load_prior(model: str, device: torch.device, offline: bool, controlnet: str | None, lora: str | None,
                vae: str | None, lora_weight: float) -> Prior:
    check_names(model, controlnet, lora, vae)
    model, controlnet, lora, vae = (from_hub_url(source, offline) if source else source
                                    for source in (model, controlnet, lora, vae))
    kind = model_kind(model)
    if kind == "plugin":
        if controlnet or lora or vae:
            raise ModelError(protocol.E_MODEL_NOT_FOUND, "a plug-in prior takes no ControlNet, LoRA or VAE from "
                             "Kiln: build them into the prior the plug-in returns")
        return load_plugin(model[len(PLUGIN):], device, offline)
    if kind == "tiny":
        from .tiny_model import build_tiny_prior
        prior = build_tiny_prior(device)
    else:
        prior = _load_stable_diffusion(model, device, offline)
    if controlnet:
        prior.controlnet = _load_controlnet(controlnet, prior, offline)
    if lora:
        _fuse_lora(prior, lora, offline, lora_weight)
    if vae:  # after the LoRA: diffusers' LoRA loader builds a pipeline around the model's own VAE
        prior.vae = _load_vae(vae, prior, offline)
    prior.few_step = prior.few_step or few_step_kind(model, lora)
    return prior


#: A Hugging Face page's address: a repository's, or a file's (``/blob/`` or ``/resolve/``).
_HUB_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?!datasets/|spaces/)([\w.-]+/[\w.-]+)"
                      r"(?:/tree/[^/?#]+|/(?:blob|resolve)/([^/]+)/([^?#]+?))?/?(?:[?#].*)?$")


def from_hub_url(source: str, offline: bool) -> str:
    """A Hugging Face page's address, as artists copy it from the browser, as what Kiln loads: a
    repository's page as its id, a file's page as that file, fetched into the hub's cache."""
    from urllib.parse import unquote

    match = _HUB_URL.match(source.strip())
    if match is None:
        return source
    repo, revision, filename = match.groups()
    if filename is None:
        return repo
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, unquote(filename), revision=revision, local_files_only=offline)
    except Exception as exc:  # hub, filesystem and permission errors all end here
        raise explain_load_error(exc, f"the file {unquote(filename)!r} of {repo!r}", offline) from None


#: Model names with this prefix name a prior written outside Kiln: ``python:MODULE:FUNCTION``.
PLUGIN = "python:"
#: What every method asks of a prior (the ``Prior`` protocol).
PRIOR_MEMBERS = ("name", "device", "schedule", "resolution", "pipeline_check", "encode_prompt", "stack_prompts",
                 "encode", "decode", "predict_eps")


def load_plugin(spec: str, device: torch.device, offline: bool) -> Prior:
    """A prior from outside the project — a multi-view model conditioned on the views' cameras, a
    house model — as ``FUNCTION(device=..., offline=...)`` of an importable ``MODULE`` returns it.
    It plugs into every method as the built-in priors do; it is checked for the ``Prior``
    members before any job uses it."""
    import importlib

    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"plug-in prior {spec!r} is not MODULE:FUNCTION: write the "
                         "model as python:my_package.priors:make_prior")
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"cannot load plug-in prior {spec!r}: {exc}. Put its module "
                         "on the backend's PYTHONPATH (or install it into the backend environment)") from None
    prior = factory(device=device, offline=offline)
    missing = [m for m in PRIOR_MEMBERS if not hasattr(prior, m)]
    if missing:
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"plug-in prior {spec!r} returned a {type(prior).__name__} "
                         f"without {', '.join(missing)}: see the Prior protocol in backend/prior.py")
    return prior


def hub_offline(offline: bool) -> bool:
    """Whether the hub is off limits: asked for (--offline, Blender's online access off), or set for
    the whole environment as huggingface_hub reads it (HF_HUB_OFFLINE)."""
    return offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


@contextlib.contextmanager
def kept_off_the_hub(offline: bool) -> Iterator[None]:
    """Offline means no request at all while a model loads: diffusers reaches the hub for a single
    checkpoint's configuration even when told ``local_files_only``, which it sets aside when that
    configuration is not cached, and transformers for an adapter file. So a standing backend
    (started online) serving a Blender whose online access is off looked up huggingface.co.
    huggingface_hub's own switch, which refuses every request, is on for the load; the
    environment's HF_HUB_OFFLINE sets it for good."""
    from huggingface_hub import constants

    if not offline or constants.HF_HUB_OFFLINE:
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def first_download(source: str, offline: bool) -> bool:
    """Whether loading ``source`` (a model, ControlNet, LoRA or VAE) will download it: a Hugging
    Face id this machine has never fetched, with the hub in reach. The first load of SD takes
    minutes (gigabytes), which the artist should be told rather than watch 'loading' stand still."""
    from huggingface_hub import constants

    if hub_offline(offline) or not HF_ID.match(source) or Path(source).expanduser().exists():
        return False
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{source.replace('/', '--')}" / "snapshots"
    return not (snapshots.is_dir() and any(snapshots.iterdir()))


def few_step_kind(model: str, lora: str | None = None) -> str | None:
    """'lcm' or 'turbo' when the model (or its LoRA) is a few-step distillation, by the names
    they are published under (latent-consistency/lcm-lora-sdv1-5, SimianLuo/LCM_Dreamshaper_v7,
    stabilityai/sd-turbo); checkpoints that ship an LCMScheduler are recognised on loading."""
    names = f"{model} {lora or ''}".lower()
    if "lcm" in names:
        return "lcm"
    return "turbo" if "turbo" in names else None


def _fuse_lora(prior: LatentDiffusionPrior, source: str, offline: bool, weight: float = 1.0) -> None:
    """Load a LoRA through diffusers' pipeline loader (Kohya or diffusers format, id, folder or
    file) and fuse it into the UNet and text encoder, so inference costs nothing extra."""
    path = Path(source).expanduser()
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # imports transformers' image processors: seconds

    # The pipeline wants a scheduler that LoRA loading never uses; with the defaults' steps_offset 0
    # and clip_sample on it would warn, at every fuse, that the config is outdated.
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer,
                                   unet=prior.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    where, local = (str(path), True) if path.exists() else (source, offline)
    try:
        # The file is read twice: handed the converted dict instead, diffusers would lose a Kohya
        # LoRA's alphas (its scale), which only reading the file yields.
        with _stand_ins(path):
            adapted = _adapted_layers(pipe.lora_state_dict(where, local_files_only=local)[0])
            pipe.load_lora_weights(where, local_files_only=local)
        missing = adapted - _loaded_layers(pipe)
        if not missing:
            pipe.fuse_lora(lora_scale=weight)
            pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    except Exception as exc:  # hub, filesystem, format and shape errors all end here
        if "size mismatch for " not in str(exc):  # torch's load_state_dict names each layer sized otherwise
            raise explain_load_error(exc, f"LoRA {source!r}", offline, local=path.exists()) from None
        missing = len({part.split(":", 1)[0].split(".lora")[0] for part in str(exc).split("size mismatch for ")[1:]})
    if missing:
        raise ModelError(protocol.E_MODEL_NOT_FOUND,
                         f"LoRA {source!r} does not fit {prior.name}: {missing} of the layers it adapts "
                         f"{'are' if missing > 1 else 'is'} missing from {prior.name} or sized otherwise, so it was "
                         "trained on another model (an SDXL LoRA on SD 1.5, say) or adapts layers diffusers cannot "
                         "load. Pick a LoRA made for this model's base, or the model the LoRA was made for")


def _adapted_layers(weights: dict[str, Any]) -> int:
    """How many layers a LoRA changes: one up (B) matrix each, in every layout diffusers converts
    to, counted where it is not zero (as ``_loaded_layers`` counts them)."""
    return sum(1 for key, up in weights.items() if key.endswith(("up.weight", "lora_B.weight")) and bool(up.any()))


def _loaded_layers(pipe: Any) -> int:
    """How many layers a LoRA was loaded into. diffusers loads the layers that match the model and
    only logs the rest, so a LoRA for another model would otherwise be fused in part, changing the
    model in ways its author never trained, without a word in Blender. peft adds adapters by layer
    name and starts their up (B) matrices at zero, so a layer the file filled is one whose B is not."""
    return sum(1 for model in (pipe.unet, pipe.text_encoder) for layer in model.modules()
               if isinstance(getattr(layer, "lora_B", None), torch.nn.ModuleDict)
               and any(bool(up.weight.any()) for up in layer.lora_B.values()))


def _load_vae(source: str, prior: LatentDiffusionPrior, offline: bool) -> Any:
    """An autoencoder in place of the model's: TAESD (``madebyollin/taesd`` for SD 1.x/2.x, a
    diffusers AutoencoderTiny) encodes and decodes views many times faster, with slightly softer
    detail, and few-step jobs spend more time in the VAE than in the UNet; or a full VAE (such as
    ``stabilityai/sd-vae-ft-mse``), as artists swap VAEs elsewhere. An id or folder loads whichever
    class its config names; a single .safetensors file is TAESD in diffusers' layout or an
    original-layout full VAE."""
    from diffusers import AutoencoderKL, AutoencoderTiny, AutoModel

    def from_file(path: Path) -> Any:
        from safetensors import safe_open

        if path.suffix.lower() == ".safetensors":
            with safe_open(str(path), "pt") as weights:
                if any(key.startswith("encoder.layers.") for key in weights.keys()):
                    return _taesd_file(path)
        return AutoencoderKL.from_single_file(str(path), dtype=prior.dtype, local_files_only=offline)

    vae = _load_part(source, "VAE", offline, from_file,
                     lambda name, local: AutoModel.from_pretrained(name, dtype=prior.dtype,
                                                                   local_files_only=local,
                                                                   variant=_folder_variant(Path(name))))
    if not isinstance(vae, (AutoencoderKL, AutoencoderTiny)):
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"{source!r} holds a {type(vae).__name__}, not a VAE: give an "
                         "autoencoder such as 'madebyollin/taesd' or 'stabilityai/sd-vae-ft-mse'")
    own = prior.vae.config
    if (vae.config.latent_channels, len(vae.config.block_out_channels)) != \
            (own.latent_channels, len(own.block_out_channels)):
        raise ModelError(protocol.E_MODEL_NOT_FOUND,
                         f"VAE {source!r} has {vae.config.latent_channels} latent channels at 1/"
                         f"{2 ** (len(vae.config.block_out_channels) - 1)} size, and {prior.name} works in "
                         f"{own.latent_channels} at 1/{prior.latent_factor}: pick the VAE made for this model "
                         "(madebyollin/taesd for SD 1.x/2.x)")
    scale, own_scale = vae.config.get("scaling_factor"), own.get("scaling_factor")
    if isinstance(vae, AutoencoderKL) and isinstance(prior.vae, AutoencoderKL) and abs(scale - own_scale) > 1e-4:
        # The same architecture trained to another latent space (SDXL's VAE on SD 1.5): every view
        # would decode to wrong colours and the job would still finish.
        raise ModelError(protocol.E_MODEL_NOT_FOUND,
                         f"VAE {source!r} scales its latents by {scale:g}, and {prior.name}'s by {own_scale:g}: it "
                         f"was made for another model{' (SDXL)' if abs(scale - 0.13025) < 1e-4 else ''}. Pick the "
                         "VAE made for this model ('stabilityai/sd-vae-ft-mse' or 'madebyollin/taesd' for SD "
                         "1.x/2.x)")
    return vae.to(prior.device, prior.dtype).eval()


def _taesd_file(path: Path) -> Any:
    """TAESD's weights in diffusers' layout as one file: the published architecture, read with no
    hub access (there is no config to fetch)."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    vae = AutoencoderTiny()
    try:
        vae.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ModelError(protocol.E_MODEL_NOT_FOUND,
                         f"{str(path)!r} is not TAESD's published architecture ({str(exc).splitlines()[0]}): give "
                         "the folder it came in (with its config.json), or a Hugging Face id") from None
    return vae


def _load_controlnet(source: str, prior: LatentDiffusionPrior, offline: bool) -> Any:
    from diffusers import ControlNetModel

    published = _published_config(source, "config.json", offline)
    if published is not None:
        _check_controlnet(source, published, prior)
    net = _load_part(source, "ControlNet", offline,
                     lambda path: ControlNetModel.from_single_file(str(path), dtype=prior.dtype,
                                                                   local_files_only=offline),
                     lambda name, local: ControlNetModel.from_pretrained(name, dtype=prior.dtype,
                                                                         local_files_only=local,
                                                                         variant=_folder_variant(Path(name))))
    _check_controlnet(source, net.config, prior)
    return net.to(prior.device).eval()


#: A depth ControlNet for each family, to name in a refusal.
_DEPTH_CONTROLNETS = {"SD 1.x": "'lllyasviel/sd-controlnet-depth'",
                      "SD 2.x": "'thibaud/controlnet-sd21-depth-diffusers'"}


def _check_controlnet(source: str, config: dict, prior: LatentDiffusionPrior) -> None:
    """A ControlNet adds its residuals to the UNet's at every level, so it must be cut from the
    same architecture: an SD 1.5 ControlNet on SD 2.1 would fail at the first denoising step."""
    ours = prior.unet.config
    width, levels = config.get("cross_attention_dim"), tuple(config.get("block_out_channels") or ())
    if (width, levels) == (ours["cross_attention_dim"], tuple(ours["block_out_channels"])):
        return
    theirs, family = _family(config), _family(ours)
    if theirs and family and theirs != family:
        instead = _DEPTH_CONTROLNETS.get(family)
        raise ModelError(protocol.E_MODEL_NOT_FOUND,
                         f"ControlNet {source!r} was made for {theirs}, and {prior.name} is {family}: pick a depth "
                         f"ControlNet made for {family}{f' such as {instead}' if instead else ''}, or a {theirs} "
                         "model")
    raise ModelError(protocol.E_MODEL_NOT_FOUND,
                     f"ControlNet {source!r} was cut from another UNet than {prior.name}'s (text embeddings {width} "
                     f"wide against {ours['cross_attention_dim']}, levels {levels} against "
                     f"{tuple(ours['block_out_channels'])}): pick a depth ControlNet made for the model's base")


def _load_part(source: str, what: str, offline: bool, from_file: Callable[[Path], Any],
               from_pretrained: Callable[[str, bool], Any]) -> Any:
    """A model part (ControlNet, VAE) given as a single file, a diffusers folder or a Hugging Face
    id; ``from_pretrained`` gets the name and whether to stay local. The many ways loading fails
    become one message that says what to do."""
    path = Path(source).expanduser()
    try:
        if path.is_file():
            with _stand_ins(path):
                return from_file(path)
        if path.is_dir() or HF_ID.match(source):
            return from_pretrained(str(path) if path.is_dir() else source, offline or path.is_dir())
    except ModelError:
        raise
    except Exception as exc:  # hub, filesystem, format and config errors all end here
        raise explain_load_error(exc, f"{what} {source!r}", offline, local=path.exists()) from None
    raise unknown_part(what, source)


#: An example of a name each part's field takes, for the refusal of one that names nothing.
_PART_EXAMPLES = {"LoRA": "'latent-consistency/lcm-lora-sdv1-5'", "VAE": "'madebyollin/taesd' (fast, for SD 1.x/2.x)",
                  "ControlNet": "'lllyasviel/sd-controlnet-depth'"}


def unknown_part(what: str, source: str) -> ModelError:
    return ModelError(protocol.E_MODEL_NOT_FOUND, f"unknown {what} {source!r}: give a Hugging Face id such as "
                      f"{_PART_EXAMPLES[what]}, a folder, or a .safetensors file")


#: The files a part's weights come in: safetensors, and PyTorch's pickles.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def _not_weights(what: str, path: Path) -> str | None:
    """Why a file or folder given for a part holds no weights (a picture, a text file, the folder
    above the one that holds them), or None: refused by their names, before the loaded model goes."""
    instead = f"give the {what}'s .safetensors file or its folder, or a Hugging Face id such as {_PART_EXAMPLES[what]}"
    if path.is_file() and path.suffix.lower() not in _WEIGHT_SUFFIXES:
        kind = f"a {path.suffix} file" if path.suffix else "a file without an extension"
        return f"{what} {str(path)!r} is {kind}, not weights: {instead}"
    if path.is_dir() and not any(f.name == "config.json" or (f.suffix.lower() in _WEIGHT_SUFFIXES
                                                             and not f.name.startswith(".")) for f in path.iterdir()):
        return f"folder {str(path)!r} holds no {what} (no config.json, no weights file): {instead}"
    return None


def names_weights(source: str) -> bool:
    """Whether a part's ``source`` is a form its loader loads (a file or folder here, a Hugging
    Face id or page), judged without loading or fetching anything (see ``model_kind``)."""
    return Path(source).expanduser().exists() or HF_ID.match(source) is not None \
        or _HUB_URL.match(source.strip()) is not None


#: A model's family, by the width of the text embeddings its UNet (or ControlNet) attends to.
_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
#: What to pick instead of a model Kiln cannot use.
_PICK_SD = ("pick an SD 1.x or 2.x model, such as 'stable-diffusion-v1-5/stable-diffusion-v1-5' (the default), "
            "'stabilityai/stable-diffusion-2-1-base' or a fine-tune of either")


def _family(config: dict) -> str | None:
    return _FAMILIES.get(config.get("cross_attention_dim"))


def _published_config(source: str, filename: str, offline: bool) -> dict | None:
    """A config file of a diffusers folder or Hugging Face repo, read before its weights are
    fetched (kilobytes rather than gigabytes); None where it cannot be had, so that loading itself
    reports why."""
    import json

    path = Path(source).expanduser()
    try:
        if path.is_dir():
            file = path / filename
        elif HF_ID.match(source):
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(source, filename, local_files_only=offline))
        else:
            return None
        return json.loads(file.read_text(encoding="utf-8"))
    except Exception:  # absent, offline, private: from_pretrained says which, in its own words
        return None


def check_architecture(label: str, unet: dict, index: dict | None = None) -> None:
    """Refuse a model whose architecture is not SD 1.x/2.x's, which Kiln's prior is written for: one
    CLIP text encoder feeding a UNet that takes four latent channels (five with SD 2's depth channel).
    SDXL, inpainting and edit models load as a Stable Diffusion pipeline all the same and would fail
    at the first denoising step with a shape error; ``index`` is the folder's model_index.json."""
    index = index or {}
    name = index.get("_class_name", "")
    if index and ("transformer" in index or "unet" not in index):
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"{label} is a {name or 'pipeline without a UNet'}, not Stable "
                         f"Diffusion 1.x/2.x, which Kiln's priors are built on: {_PICK_SD}")
    if "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"{label} is an SDXL model (two text encoders, 1024² views), "
                         f"which Kiln does not run yet: {_PICK_SD}")
    channels = unet.get("in_channels")
    if channels is None:  # the UNet's config is not to be had before loading: checked after
        return
    if channels == 9:
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"{label} is an inpainting model (its UNet takes a mask and a "
                         "masked image beside the latents) and Kiln denoises whole views: pick the model it was "
                         "made from (for 'stable-diffusion-v1-5/stable-diffusion-inpainting', "
                         "'stable-diffusion-v1-5/stable-diffusion-v1-5')")
    if channels not in (4, 5):
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"{label}'s UNet takes {channels} input channels, and Kiln "
                         f"drives text-to-image UNets of 4 (5 with SD 2's depth channel): {_PICK_SD}")


#: Tensor names in single-file checkpoints (the original layout) that mark other families.
_SDXL_KEY, _DIT_KEYS = "conditioner.embedders.1.", ("model.diffusion_model.joint_blocks.", "double_blocks.")
_UNET_INPUT_KEY = "model.diffusion_model.input_blocks.0.0.weight"
_VAE_KEYS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def _check_checkpoint(path: Path, label: str) -> None:
    """``check_architecture`` for a single .safetensors checkpoint, from its header alone (tensor
    names and shapes): an SDXL checkpoint is 6.5 GB to read, and then failed at the first UNet call.
    A LoRA, VAE or ControlNet file put in the model field is named as such."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as weights:
            names = list(weights.keys())
            channels = weights.get_slice(_UNET_INPUT_KEY).get_shape()[1] if _UNET_INPUT_KEY in names else 4
    except Exception:  # not a safetensors file: loading says so in its own words
        return
    part = ("LoRA" if names and all("lora" in name or name.endswith(".alpha") for name in names) else
            "ControlNet" if any(name.startswith("control_model.") or "controlnet_cond_embedding" in name
                                for name in names) else
            "VAE" if names and all(name.startswith(_VAE_KEYS) for name in names) else None)
    if part:  # the file went into the wrong field
        raise ModelError(protocol.E_MODEL_NOT_FOUND,
                         f"{label} is a {part}, not a model: put it in the {part} field (--{part.lower()} in the "
                         "CLI) and keep a Stable Diffusion model, such as the default, in the model field")
    if any(name.startswith(_DIT_KEYS) for name in names):
        check_architecture(label, {}, {"_class_name": "diffusion transformer (SD 3, Flux)", "transformer": []})
    sdxl = any(name.startswith(_SDXL_KEY) for name in names)
    check_architecture(label, {"in_channels": channels, "addition_embed_type": "text_time" if sdxl else None})


def _load_stable_diffusion(model: str, device: torch.device, offline: bool) -> LatentDiffusionPrior:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    path, kind = Path(model).expanduser(), model_kind(model)
    if kind in ("folder", "hub"):
        # A diffusion transformer's repository has no unet/ but tens of GB in its own parts.
        index = _published_config(model, "model_index.json", offline)
        unet = _published_config(model, "unet/config.json", offline) if index is None or "unet" in index else None
        if index is not None or unet is not None:
            check_architecture(f"model {model!r}", unet or {}, index)
    if kind == "folder":
        pipe = _from_pretrained(str(path), dtype, offline=True, label=f"folder {model!r}")
    elif kind == "checkpoint":
        if path.suffix.lower() == ".safetensors":
            _check_checkpoint(path, f"checkpoint {str(path)!r}")
        return _read_parameterisation(_from_pipeline(model, _from_single_file(path, dtype, offline), device, dtype),
                                      path)
    elif kind == "hub":
        pipe = _from_pretrained(model, dtype, offline, label=f"Hugging Face model {model!r}")
    else:
        raise unknown_model(model)
    return _from_pipeline(model, pipe, device, dtype)


def unknown_model(model: str) -> ModelError:
    return ModelError(protocol.E_MODEL_NOT_FOUND,
                      f"unknown model {model!r}: it is not 'tiny', an existing diffusers folder, a .safetensors file, "
                      "or a Hugging Face id like 'stabilityai/stable-diffusion-2-1-base'")


def check_names(model: str, controlnet: str | None = None, lora: str | None = None, vae: str | None = None) -> None:
    """Refuse a model, ControlNet, LoRA or VAE name that loads nothing, by its form alone (nothing
    is loaded or fetched): ``load_prior`` starts with it, and the model cache asks it before it lets
    the loaded model go, so that a typo costs no reload."""
    kind, folder = model_kind(model), Path(model).expanduser()
    if kind is None:
        raise unknown_model(model)
    if kind == "folder" and not (folder / "model_index.json").is_file():
        files = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in _CHECKPOINT_SUFFIXES
                       and not f.name.startswith("."))  # Kiln's own index of an asset library, say
        raise ModelError(protocol.E_MODEL_NOT_FOUND, f"folder {model!r} is not a diffusers folder (it has no "
                         "model_index.json): " + (f"give the checkpoint file it holds, {files[0]!r}, instead" if files
                                                  else "give a diffusers folder (model_index.json and a folder per "
                                                  "part), a .safetensors file or a Hugging Face id"))
    for what, source in (("ControlNet", controlnet), ("LoRA", lora), ("VAE", vae)):
        if source and not names_weights(source):
            raise unknown_part(what, source)
        if source and (problem := _not_weights(what, Path(source).expanduser())):
            raise ModelError(protocol.E_MODEL_NOT_FOUND, problem)


#: The files a whole model comes in as one checkpoint.
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def model_kind(model: str) -> str | None:
    """What ``model`` names, judged by its form without loading or fetching anything: 'tiny',
    'plugin', 'folder', 'checkpoint', 'hub' (an id, or a page's address), or None for a name that
    loads nothing. Loading dispatches on it, and ``check_names`` refuses a None before the loaded
    model makes way, so that a typo costs no reload."""
    path = Path(model).expanduser()
    if model == TINY:
        return "tiny"
    if model.startswith(PLUGIN):
        return "plugin"
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "checkpoint" if path.suffix.lower() in _CHECKPOINT_SUFFIXES else None
    return "hub" if HF_ID.match(model) or _HUB_URL.match(model.strip()) else None


def _from_pretrained(source: str, dtype: torch.dtype, offline: bool, label: str) -> Any:
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(source, dtype=dtype, local_files_only=offline,
                                                       variant=_folder_variant(Path(source) / "unet"),
                                                       safety_checker=None, requires_safety_checker=False)
    except Exception as exc:  # hub, filesystem and config errors all end here
        raise explain_load_error(exc, label, offline, local=Path(source).is_dir()) from None


def _folder_variant(folder: Path) -> str | None:
    """The variant a downloaded folder of weights (a model part's, or a pipeline's UNet's) holds
    them as when it holds no plain ones: one fetched with ``variant="fp16"`` has only
    ``diffusion_pytorch_model.fp16.safetensors`` (or its shards), which diffusers reads only when
    told the variant."""
    names = [f.name for f in folder.glob("*") if f.suffix in (".safetensors", ".bin")]
    variants = {name.split(".")[1].split("-")[0] if name.count(".") == 2 else None for name in names}
    return None if not variants or None in variants else sorted(variants)[0]


def _from_single_file(path: Path, dtype: torch.dtype, offline: bool) -> Any:
    from diffusers import StableDiffusionPipeline

    try:
        with _stand_ins(path):
            return StableDiffusionPipeline.from_single_file(str(path), dtype=dtype, local_files_only=offline)
    except Exception as exc:
        raise explain_load_error(exc, f"checkpoint {str(path)!r}", offline, local=True) from None


#: A checkpoint's companion configuration (A1111's and ComfyUI's convention: the checkpoint's name
#: with .yaml) says ``parameterization: "v"`` for a v-prediction model and nothing for a noise one.
_V_PARAMETERISATION = re.compile(r"""^\s*parameterization:\s*["']?v["']?\s*(?:#.*)?$""", re.M)
#: SD 2's text width: its noise-predicting models (2.x-base, depth) work at 512², its v ones at 768².
_SD2_TEXT_WIDTH = 1024


def _read_parameterisation(prior: LatentDiffusionPrior, checkpoint: Path) -> LatentDiffusionPrior:
    """Settle what a single checkpoint's UNet predicts, which the file does not record: diffusers
    reads every SD 2 file as 2.1's 768² v-prediction and every SD 1 file as a noise predictor, so a
    fine-tune of 2.1-base (512², noise) gave textures of noise. A companion .yaml decides where
    there is one; otherwise ``probe_prediction_type`` does."""
    config = checkpoint.with_suffix(".yaml")
    if config.is_file():
        v = _V_PARAMETERISATION.search(config.read_text(encoding="utf-8", errors="replace"))
        prior.prediction_type = "v_prediction" if v else "epsilon"
    else:
        prior.prediction_type = probe_prediction_type(prior)
    if prior.unet.config.cross_attention_dim == _SD2_TEXT_WIDTH:
        prior.unet.register_to_config(sample_size=96 if prior.prediction_type == "v_prediction" else 64)
    return prior


@torch.no_grad()
def probe_prediction_type(prior: LatentDiffusionPrior) -> str:
    """Whether the UNet predicts noise or v, from one call at the last timestep, whose input is
    almost pure noise (SD: 0.07 of the image): a noise predictor returns about its input, a v
    predictor about minus the image it expects, which owes the input next to nothing. The cosine
    between output and input is near 1 for the one and near 0 for the other; 0.5 splits them."""
    t = prior.schedule.num_train_timesteps - 1
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, prior.vae.config.latent_channels, 16, 16), generator=generator).to(prior.device)
    size = 16 * prior.latent_factor
    depth = torch.full((1, 1, size, size), 0.5, device=prior.device) if prior.unet.config.in_channels == 5 else None
    out = prior._unet(x.to(prior.dtype), t, prior.encode_prompt("", "")[:1], depth)
    agreement = torch.nn.functional.cosine_similarity(out.flatten().float(), x.flatten(), dim=0)
    return "epsilon" if float(agreement) > 0.5 else "v_prediction"


#: How huggingface_hub and requests say the hub could not be reached (or was not to be).
_NO_HUB = ("localentrynotfound", "offlinemodeisenabled", "outgoing traffic", "offline mode", "connect to",
           "establish a new connection", "max retries exceeded", "connectionerror")
#: How diffusers says, offline, that the hub cache lacks a file of a model it reads a single file's
#: configuration from (a full VAE's: SD 1.5's).
_NOT_CACHED = re.compile(r"([\w.-]+/[\w.-]+) does not appear to have a file named")


#: How a machine gets at gated and private models: the hub's own login, or a token in the
#: environment of whatever starts the backend (Blender, or the shell running the CLI).
_HUB_LOGIN = "`hf auth login` in the backend's environment, or HF_TOKEN set where Blender or the CLI starts"


def explain_load_error(exc: Exception, label: str, offline: bool, local: bool = False) -> ModelError:
    """One message for the many ways loading fails; ``local``: the source is a file or folder on this
    machine, which lacks no download unless reading it reached for the hub (a single checkpoint's
    base configuration)."""
    text = f"{type(exc).__name__}: {exc}"
    wants_hub = any(sign in text.lower() for sign in _NO_HUB) or \
        (offline and (uncached := _NOT_CACHED.search(text)) is not None and not Path(uncached[1]).exists())
    if local and _pickled_objects(exc):
        return ModelError(protocol.E_MODEL_NOT_FOUND,
                          f"{label} holds Python objects besides its weights that cannot be read without running "
                          "code the file names (a pickle older than torch 1.6's, or one that calls the system): use "
                          "the model's .safetensors file (most models publish one)")
    if local and wants_hub:
        return ModelError(protocol.E_WEIGHTS_OFFLINE,
                          f"{label} is on this machine, but reading it needs files it does not hold (for a single "
                          "checkpoint, the configuration and tokenizer of the model it was made from: a few MB from "
                          "the Hugging Face hub, fetched once and kept) and this machine is offline. Connect once, "
                          f"or give the model as a diffusers folder. ({text[:300]})")
    if local:
        return ModelError(protocol.E_MODEL_NOT_FOUND,
                          f"could not read {label}, which is on this machine ({text[:500]}): check that it is "
                          "complete and is what the field asks for")
    if offline or wants_hub:
        return ModelError(protocol.E_WEIGHTS_OFFLINE,
                          f"the weights of {label} are not on this machine and it is offline. Download them "
                          "once where there is internet (e.g. `hf download <id>`), or pick a local "
                          f"diffusers folder or .safetensors file in Kiln's model field. ({text[:300]})")
    if "no space left" in text.lower():  # the download's: gigabytes into the hub cache
        from huggingface_hub.constants import HF_HUB_CACHE
        return ModelError(protocol.E_MODEL_NOT_FOUND,
                          f"the disk ran out of space downloading {label} into the Hugging Face cache "
                          f"({HF_HUB_CACHE}): free some gigabytes there, or point HF_HOME at a disk with room, "
                          f"and try again ({text[:200]})")
    if type(exc).__name__ == "GatedRepoError" or "cannot access gated repo" in text.lower():
        return ModelError(protocol.E_MODEL_NOT_FOUND,
                          f"{label} is gated on the Hugging Face hub: accept its terms on its page there, then log "
                          f"this machine in ({_HUB_LOGIN}) and try again. ({text[:300]})")
    if "not found" in text.lower() or "404" in text or "repository" in text.lower():
        return ModelError(protocol.E_MODEL_NOT_FOUND,
                          f"{label} was not found: check the spelling of the id or path; a private model also needs "
                          f"this machine logged in ({_HUB_LOGIN}). ({text[:300]})")
    return ModelError(protocol.E_MODEL_NOT_FOUND, f"could not load {label}: {text[:500]}")


class _Unread:
    """Stands in for an object a checkpoint pickled besides its weights (a training run's callback,
    its best score), made from the pickle's data without running any of the file's code."""

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def __setstate__(self, _state: object) -> None:
        pass


@contextlib.contextmanager
def _stand_ins(path: Path) -> Iterator[None]:
    """Read a pickled checkpoint (.ckpt, .pt, .bin) weights-only, as diffusers has torch read it,
    with the objects torch does not know as ``_Unread``: a training run's .ckpt (many SD fine-tunes
    and VAEs) holds its callbacks too, and torch refused the whole file. Unpickling them for real
    would run whatever code the file names, which weights-only reading is there to prevent."""
    names: list[str] = []
    if path.suffix.lower() != ".safetensors":
        with contextlib.suppress(Exception):  # a folder, or a pickle older than torch 1.6's zip format
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    with torch.serialization.safe_globals([(type(name.rsplit(".", 1)[-1], (_Unread,), {}), name) for name in names]):
        yield


def _pickled_objects(exc: BaseException) -> bool:
    """Whether loading failed on a pickle's objects that torch's weights-only reading refuses
    (diffusers wraps that in an OSError that says only "unable to load weights")."""
    seen: BaseException | None = exc
    while seen is not None:
        if "weights only load failed" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _from_pipeline(name: str, pipe: Any, device: torch.device, dtype: torch.dtype) -> LatentDiffusionPrior:
    check_architecture(f"model {name!r}", pipe.unet.config)  # a single file has no config to read beforehand
    pipe.to(device)
    config = pipe.scheduler.config
    return LatentDiffusionPrior(name, pipe.unet.eval(), pipe.vae.eval(), pipe.text_encoder.eval(), pipe.tokenizer,
                                config.get("prediction_type", "epsilon"),
                                NoiseSchedule(pipe.scheduler.alphas_cumprod.double().cpu()), device, dtype,
                                few_step="lcm" if type(pipe.scheduler).__name__ == "LCMScheduler" else None)
