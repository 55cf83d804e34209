"""ReDream's lightweight adaptation: a LoRA of the prior's UNet, trained for a job on views of its
reference assets, attached while the job runs and removed after it (the prior is shared by later
jobs). Trained LoRAs are cached per model, reference set and settings, so the artist pays once.

Each reference is rendered from cameras spread over the sphere and captioned "<caption>, <view>"
exactly as the methods' view-dependent prompts read, so what the LoRA learns is what the prompts
ask for: the prior's viewpoint bias (every view a front view, the Janus problem) gives way to the
references' real backs and sides.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from . import protocol
from .cameras import orbit, view_suffix
from .events import Cancelled, TextureEvents
from .presets import Adaptation
from .prior import ModelError, view_prompt

if TYPE_CHECKING:
    from .retrieve import Chosen

ADAPTER = "kiln_redream"
#: Attention projections of the UNet: where LoRAs of Stable Diffusion usually live.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: Camera elevations of the training views: below the horizon to nearly overhead.
ELEVATION_RANGE = (-30.0, 75.0)


def cache_dir() -> Path:
    """``$KILN_CACHE``, else ~/.kiln/cache: trained LoRAs, reused across jobs and sessions."""
    return Path(os.environ.get("KILN_CACHE") or protocol.user_folder() / "cache")


def fingerprint(model: str, chosen: list["Chosen"], cfg: Adaptation, resolution: int, background: float) -> str:
    """What a trained LoRA depends on: the model, each reference's geometry, colours and caption,
    and the settings. Content, not file names: a re-saved asset with new colours trains anew."""
    digest = hashlib.sha256(json.dumps({"model": model, "cfg": asdict(cfg), "resolution": resolution,
                                        "background": background}, sort_keys=True).encode())
    for ref in chosen:
        digest.update(ref.caption.encode())
        for part in (ref.asset.mesh.positions, ref.asset.mesh.triangles, ref.asset.mesh.corner_uvs,
                     ref.asset.corner_colours, None if ref.asset.texture is None else ref.asset.texture.numpy()):
            digest.update(b"-" if part is None else np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:24]


def training_views(chosen: list["Chosen"], cfg: Adaptation, resolution: int, background: float, seed: int,
                   device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, H, W) renders of every reference from ``cfg.views`` cameras each (azimuth uniform,
    elevation uniform in sin over ``ELEVATION_RANGE``, i.e. uniform over that band of the sphere),
    and the caption of each render."""
    rng = np.random.default_rng(seed)
    lo, hi = (math.sin(math.radians(e)) for e in ELEVATION_RANGE)
    images, captions = [], []
    for ref in chosen:
        azimuths = rng.uniform(0, 360, cfg.views)
        elevations = np.degrees(np.arcsin(rng.uniform(lo, hi, cfg.views)))
        cams = orbit(ref.asset.mesh.positions, list(azimuths), list(elevations), ref.asset.mesh.up_axis,
                     device=device)
        with torch.no_grad():
            images.append(ref.asset.render(cams, resolution, background)[0])
        captions += [view_prompt(ref.caption, view_suffix(a, e)) for a, e in zip(azimuths, elevations, strict=True)]
    return torch.cat(images), captions


def train(prior, chosen: list["Chosen"], cfg: Adaptation, background: float, seed: int, events: TextureEvents,
          total: int) -> dict[str, torch.Tensor]:
    """Attach a fresh LoRA to ``prior.unet`` and fit it with the denoising loss on the references'
    views (the loss the model was trained with, ε or v by its prediction type). Progress shows in
    the phase text against the job's own ``total``, so the bar never changes scale."""
    from peft import get_peft_model_state_dict

    device, unet = prior.device, prior.unet
    images, captions = training_views(chosen, cfg, prior.resolution, background, seed, device)
    with torch.no_grad():
        latents = torch.cat([prior.encode(images[i:i + 8]) for i in range(0, len(images), 8)])
        embeds = {c: prior.encode_prompt(c, "")[1] for c in sorted(set(captions))}
    attach(unet, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # fp16 weights train badly: the adapter learns in fp32, its output is cast back
        p.data = p.data.float()
    optimiser = torch.optim.AdamW(params, lr=cfg.lr)
    generator = torch.Generator(device=device).manual_seed(seed)
    T = prior.schedule.num_train_timesteps
    alphas = prior.schedule.alphas_cumprod.to(device, torch.float32)
    unet.train()
    try:
        for step in range(cfg.steps):
            if events.cancelled():
                raise Cancelled()
            rows = torch.randint(0, len(latents), (cfg.batch,), generator=generator, device=device)
            x0 = latents[rows]
            t = torch.randint(0, T, (cfg.batch,), generator=generator, device=device)
            noise = torch.randn(x0.shape, generator=generator, device=device)
            a, s = alphas[t].sqrt().view(-1, 1, 1, 1), (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
            x_t = a * x0 + s * noise
            target = a * noise - s * x0 if prior.prediction_type == "v_prediction" else noise
            cond = torch.stack([embeds[captions[int(r)]] for r in rows])
            out = unet(x_t.to(prior.dtype), t, encoder_hidden_states=cond).sample.float()
            loss = (out - target).square().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step % 10 == 0 or step == cfg.steps - 1:
                events.progress(0, total, f"adapting the model {step + 1}/{cfg.steps} (loss {loss.item():.3f})")
    finally:
        unet.eval()
        for p in params:
            p.requires_grad_(False)
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}


def attach(unet, cfg: Adaptation) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=TARGETS,
                                init_lora_weights="gaussian"), adapter_name=ADAPTER)


@contextmanager
def adapted(prior, identity: str, chosen: list["Chosen"], cfg: Adaptation, background: float, seed: int,
            events: TextureEvents, total: int) -> Iterator[None]:
    """The prior with the references' LoRA attached (trained now, or read from the cache), for the
    length of a job; whatever happens, the prior leaves without it."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    if getattr(prior, "unet", None) is None:
        raise ModelError(protocol.E_BAD_REQUEST, f"{prior.name} has no network weights to adapt: Adapt Model needs "
                         "a diffusion model (Stable Diffusion, or the tiny model); turn it off for this prior")
    path = cache_dir() / "lora" / f"{fingerprint(identity, chosen, cfg, prior.resolution, background)}.safetensors"
    try:
        if path.is_file():
            events.log(f"adapting the model: reusing the LoRA trained on these references ({path.name})")
            attach(prior.unet, cfg)
            set_peft_model_state_dict(prior.unet, load_file(str(path), device=str(prior.device)), adapter_name=ADAPTER)
        else:
            events.log(f"adapting the model to {len(chosen)} reference(s): {cfg.steps} LoRA steps on "
                       f"{cfg.views} views each")
            state = train(prior, chosen, cfg, background, seed, events, total)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file(state, str(tmp), metadata={"kiln": json.dumps({"model": identity, **asdict(cfg)})})
                os.replace(tmp, path)
            except (OSError, SafetensorError) as exc:  # a full disk or read-only home: the LoRA still serves
                events.log(f"could not keep the trained LoRA in {path.parent} ({exc}): this job uses it, and the "
                           "next with these references trains it again; set KILN_CACHE to a writable folder")
        yield
    finally:
        prior.unet.unload_lora()
