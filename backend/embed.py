"""Embeddings that make an asset library searchable by prompt.

Text works offline on any CPU out of the box: WordLlama ships its 256-d token embeddings and
tokenizer inside its wheel, so indexing needs no download and no GPU. CLIP (text and images) is
used when the user has its weights (a Hugging Face id or a local folder): it re-ranks by what
the assets look like, and scores which way an asset faces. Every embedding is L2-normalised,
so a dot product is the cosine similarity.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import protocol
from .prior import HF_ID, ModelError, explain_load_error, from_hub_url, kept_off_the_hub


class TextEmbedder(Protocol):
    name: str   # stored with the index: vectors from another embedder are not comparable
    dim: int

    def text(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32, unit rows."""


class WordLlamaEmbedder:
    """WordLlama's l2_supercat model at 256 dimensions, read from the package's own files."""

    name = "wordllama-l2_supercat-256"
    dim = 256

    def __init__(self) -> None:
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        import wordllama  # its __init__ calls logging.basicConfig(INFO); put the root logger back

        root.setLevel(level)
        root.handlers[:] = handlers
        # disable_download: the weights and tokenizer are in the wheel (cache_dir points there).
        self.model = wordllama.WordLlama.load(config="l2_supercat", dim=self.dim,
                                              cache_dir=Path(wordllama.__file__).parent, disable_download=True)

    def text(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.model.embed(texts, norm=True), np.float32)


class ClipEmbedder:
    """CLIP text and image embeddings (transformers), for image re-ranking and facing."""

    def __init__(self, model, tokenizer, name: str, device: torch.device) -> None:
        self.model, self.tokenizer, self.name, self.device = model, tokenizer, name, device
        vision = model.config.vision_config
        self.size = vision.image_size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)
        self.dim = model.config.projection_dim

    @classmethod
    def load(cls, source: str, offline: bool, device: torch.device) -> "ClipEmbedder":
        """From a Hugging Face id (e.g. openai/clip-vit-base-patch32) or a local folder holding a
        CLIPModel and its tokenizer."""
        from transformers import CLIPModel, CLIPTokenizer

        source = from_hub_url(source, offline)  # a repository's page, copied from the browser
        path = Path(source).expanduser()
        if not path.is_dir() and not HF_ID.match(source):
            raise ModelError(protocol.E_MODEL_NOT_FOUND,
                             f"unknown CLIP model {source!r}: give a Hugging Face id such as "
                             "'openai/clip-vit-base-patch32' or a folder with a CLIPModel and its tokenizer, or "
                             "leave CLIP empty to search by text alone")
        where = str(path) if path.is_dir() else source
        try:  # transformers asks the hub for an adapter file even when told local_files_only
            with kept_off_the_hub(offline):  # on already where the environment sets HF_HUB_OFFLINE
                model = CLIPModel.from_pretrained(where, local_files_only=offline or path.is_dir()).to(device).eval()
                tokenizer = CLIPTokenizer.from_pretrained(where, local_files_only=offline or path.is_dir())
        except Exception as exc:  # hub, filesystem and config errors all end here
            raise explain_load_error(exc, f"CLIP {source!r}", offline, local=path.is_dir()) from None
        return cls(model, tokenizer, source, device)

    @torch.no_grad()
    def text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _unit(self.model.get_text_features(**tokens))

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) in [0, 1] → (N, dim); resized to CLIP's input size, CLIP's normalisation."""
        x = F.interpolate(images.to(self.device).float(), size=(self.size, self.size), mode="bilinear",
                          antialias=True, align_corners=False)
        return _unit(self.model.get_image_features(pixel_values=(x - self.mean) / self.std))


def _unit(features) -> np.ndarray:
    features = getattr(features, "pooler_output", features)  # newer transformers return an output object
    return F.normalize(features.float(), dim=-1).cpu().numpy()
