"""The built-in tiny model: Stable Diffusion's architecture at toy size, with seeded random weights.

It exists so that the whole path — prompt encoding, UNet, VAE, DDIM, reconstruction, streaming —
runs offline on any CPU in seconds, for the tests and the README's demo. Its pictures are noise:
every result made with it is labelled a pipeline check. Nothing is downloaded: the tokenizer's
vocabulary is generated (byte-level, no merges) and the weights come from a fixed seed, so the
model is the same on every machine.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .diffusion import NoiseSchedule
from .prior import TINY, LatentDiffusionPrior

_SEED = 20261121
_TEXT_WIDTH = 32


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-unicode table, the alphabet of a byte-level BPE vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def build_tiny_prior(device: torch.device) -> LatentDiffusionPrior:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(_SEED)
    try:
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, block_out_channels=(32, 32, 64), latent_channels=4, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=1000, hidden_size=_TEXT_WIDTH, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    finally:
        torch.random.set_rng_state(generator_state)
    with tempfile.TemporaryDirectory(prefix="kiln-tiny-tokenizer-") as folder:
        tokenizer = _tokenizer(Path(folder))
    unet, vae, text_encoder = (m.to(device).eval() for m in (unet, vae, text_encoder))
    return LatentDiffusionPrior(TINY, unet, vae, text_encoder, tokenizer, "epsilon",
                                NoiseSchedule.stable_diffusion(), device, torch.float32, pipeline_check=True)
