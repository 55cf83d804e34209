"""Depth-conditioned priors: depth maps, a depth ControlNet and SD 2's depth UNet, through the
real loading code with tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT

from backend.cameras import orbit
from backend.events import TextureEvents
from backend.jobs import JobRequest, ModelCache, run_texture_job
from backend.mesh_file import load_mesh_file
from backend.prior import LatentDiffusionPrior, Views, load_prior
from backend.raster import rasterize_views
from backend.texturing import depth_maps


def test_depth_maps_put_near_surfaces_bright_and_background_at_zero() -> None:
    """Two squares facing the camera, one nearer: near = 1, far = 0.1, background 0."""
    quad = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float32)
    near = np.c_[quad * 0.3 + [0.5, 0], np.full(4, 1.0, np.float32)]
    far = np.c_[quad * 0.3 - [0.5, 0], np.full(4, -1.0, np.float32)]
    positions = torch.tensor(np.concatenate([near, far]), dtype=torch.float32)
    triangles = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    cams = orbit(positions.numpy(), [0.0], [0.0], "y")  # from +Z: the z = 1 square is the near one
    raster = rasterize_views(positions, triangles, cams.mvp, 64)
    depth = depth_maps(positions, triangles, cams, raster)[0, 0]
    near_px = depth[raster.mask[0].flip(0) & (torch.arange(64) > 32)[None, :]]
    far_px = depth[raster.mask[0].flip(0) & (torch.arange(64) < 32)[None, :]]
    assert torch.allclose(near_px, torch.ones_like(near_px), atol=1e-4)
    assert torch.allclose(far_px, torch.full_like(far_px, 0.1), atol=1e-4)
    assert depth[~raster.mask[0].flip(0)].abs().max() == 0


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory):
    """A tiny depth ControlNet cut from the tiny UNet and saved as a diffusers folder. Its zero
    convolutions (the depth embedding's last layer and the residual outputs) start at zero, as
    for training, so they get small random weights here for depth to matter."""
    from diffusers import ControlNetModel

    tiny = load_prior("tiny", torch.device("cpu"))
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(tiny.unet, conditioning_embedding_out_channels=(16, 32, 96))
    with torch.no_grad():
        for p in [*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters(),
                  *net.controlnet_cond_embedding.conv_out.parameters()]:
            p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-depth"
    net.save_pretrained(folder)
    return folder


def test_controlnet_loads_from_a_folder_and_conditions_on_depth(controlnet_folder) -> None:
    prior = load_prior("tiny", torch.device("cpu"), controlnet=str(controlnet_folder))
    assert prior.wants_depth
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cams = orbit(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), [0.0, 90.0], [0.0, 0.0], "y")
    embeds = prior.encode_prompt("a vase", "")
    flat = prior.predict_eps(x, 500, embeds, Views(cams, depth=torch.full((2, 1, 64, 64), 0.5)))
    ramp = prior.predict_eps(x, 500, embeds, Views(cams, depth=torch.linspace(0, 1, 64).expand(2, 1, 64, 64)))
    assert not torch.allclose(flat[1], ramp[1], atol=1e-4)
    with pytest.raises(ValueError, match="depth-conditioned"):
        prior.predict_eps(x, 500, embeds, Views(cams))
    with pytest.raises(Exception, match="unknown ControlNet"):
        load_prior("tiny", torch.device("cpu"), controlnet="not a controlnet!")


def test_a_controlnet_cut_from_another_unet_is_refused_before_its_weights_load(controlnet_folder, tmp_path) -> None:
    """An SD 1.5 ControlNet on SD 2.1 (or an SDXL one on SD 1.5) would fail at the first denoising
    step with a shape error; its config alone (a folder without weights, as a hub download begins)
    is enough to refuse it, naming both families and a ControlNet that fits."""
    import json
    from types import SimpleNamespace

    from backend.prior import ModelError, _check_controlnet

    config = json.loads((controlnet_folder / "config.json").read_text())
    wider = tmp_path / "sdxl-depth"
    wider.mkdir()
    (wider / "config.json").write_text(json.dumps(dict(config, cross_attention_dim=64)))
    with pytest.raises(ModelError, match=r"cut from another UNet than tiny's \(text embeddings 64 wide against 32"):
        load_prior("tiny", torch.device("cpu"), controlnet=str(wider))
    sd21 = SimpleNamespace(name="stabilityai/stable-diffusion-2-1-base", unet=SimpleNamespace(config=dict(
        cross_attention_dim=1024, block_out_channels=(320, 640, 1280, 1280))))
    with pytest.raises(ModelError, match="made for SD 1.x, and stabilityai/stable-diffusion-2-1-base is SD 2.x: pick "
                                         "a depth ControlNet made for SD 2.x such as 'thibaud/controlnet-sd21-depth"):
        _check_controlnet("lllyasviel/sd-controlnet-depth", dict(config, cross_attention_dim=768), sd21)


def test_the_controlnets_weight_scales_its_steer_and_changes_without_a_reload(controlnet_folder) -> None:
    """Weight 0 leaves the plain UNet's prediction; the weight is set on the loaded model per job."""
    models = ModelCache()
    fields = {"prompt": "a vase", "model": "tiny", "controlnet": str(controlnet_folder)}
    steered = models.get(JobRequest.from_fields(fields), TextureEvents())
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cams = orbit(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), [0.0, 90.0], [0.0, 0.0], "y")
    views = Views(cams, depth=torch.linspace(0, 1, 64).expand(2, 1, 64, 64))
    embeds = steered.encode_prompt("a vase", "")
    full = steered.predict_eps(x, 500, embeds, views)[1]
    loose = models.get(JobRequest.from_fields({**fields, "controlnet_weight": 0.0}), TextureEvents())
    assert loose is steered and loose.conditioning_scale == 0.0
    plain = load_prior("tiny", torch.device("cpu")).predict_eps(x, 500, embeds, views)[1]
    assert torch.allclose(loose.predict_eps(x, 500, embeds, views)[1], plain, atol=1e-5)
    assert not torch.allclose(full, plain, atol=1e-4)


def test_texture_job_with_a_depth_controlnet_runs_end_to_end(controlnet_folder) -> None:
    mesh, _ = load_mesh_file(ROOT / "examples" / "vase.obj")
    request = JobRequest.from_fields({"prompt": "a vase", "model": "tiny", "texture_size": 512, "steps": 1,
                                          "controlnet": str(controlnet_folder)})
    final = run_texture_job(request, mesh, TextureEvents(), ModelCache())
    assert final.shape == (3, 512, 512) and float(final.std()) > 0.01


def test_sd2_depth_unet_takes_depth_as_a_fifth_channel() -> None:
    from diffusers import UNet2DConditionModel

    tiny = load_prior("tiny", torch.device("cpu"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny.unet.config, "in_channels": 5})
    prior = LatentDiffusionPrior("tiny-depth", unet, tiny.vae, tiny.text_encoder, tiny.tokenizer, "epsilon",
                                 tiny.schedule, tiny.device, tiny.dtype)
    assert prior.wants_depth
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cams = orbit(np.array([[-1, -1, -1], [1, 1, 1]], np.float32), [0.0], [0.0], "y")
    embeds = prior.encode_prompt("a vase", "")
    a = prior.predict_eps(x, 500, embeds, Views(cams, depth=torch.zeros(1, 1, 64, 64)))
    b = prior.predict_eps(x, 500, embeds, Views(cams, depth=torch.ones(1, 1, 64, 64)))
    assert a[0].shape == (1, 4, 16, 16) and not torch.allclose(a[0], b[0])
