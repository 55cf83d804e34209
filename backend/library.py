"""The artist's asset library, indexed so a prompt finds its nearest assets (ReDream's retrieval).

One file per library folder, ``.kiln-index.safetensors`` at its root: the tensors (caption
embeddings, thumbnails, CLIP image embeddings when CLIP was given) and, in the safetensors header's
metadata, the JSON that says which file each row is, with its size and modification time.
Re-indexing re-reads only files whose size or time changed, drops rows of files that are gone,
and records unreadable files with the reason (retried once they change) instead of failing.

Search is exact (one matrix product) for small libraries and goes through a usearch HNSW index
(half-precision vectors, saved beside the index when it is written) above ``EXACT_LIMIT`` assets;
with CLIP, the text hits are re-ranked by how well their
thumbnails match the prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import protocol
from .assets import ASSET_SUFFIXES, Asset, load_asset
from .cameras import orbit
from .embed import ClipEmbedder, TextEmbedder
from .mesh import MeshError
from .mesh_file import missing_texture

INDEX_FILE = ".kiln-index.safetensors"
ANN_FILE = ".kiln-index.usearch"   # the HNSW graph of large libraries, rebuilt whenever the index is
FORMAT = 1
#: Thumbnail cameras: front, right, back, left, slightly above; 64 px each.
THUMB_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)
THUMB_ELEVATION = 20.0
THUMB_SIZE = 64
#: Above this many assets, search goes through an approximate (HNSW) index.
EXACT_LIMIT = 20_000
#: Re-ranking by image looks at this many text hits per asset asked for.
RERANK_POOL = 4


@dataclass
class Entry:
    path: str        # relative to the library root, with forward slashes
    size: int
    mtime_ns: int
    caption: str


@dataclass
class Report:
    """What an indexing run did, for the progress log and the tests."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reused: int = 0
    skipped: dict[str, str] = field(default_factory=dict)   # path → why it could not be read
    untextured: dict[str, str] = field(default_factory=dict)  # path → why its texture was not found

    def summary(self, index: LibraryIndex, name: str) -> str:
        """One line for the artist or the TD, the library called ``name``; an empty index says why,
        as a wrong path is the usual cause."""
        line = (f"{name}: {len(index)} assets ({len(self.added)} new, {len(self.updated)} changed, "
                f"{len(self.removed)} removed, {self.reused} unchanged, {len(self.skipped)} unreadable)")
        if not len(index) and not self.skipped:
            line += (f": it holds no {', '.join(ASSET_SUFFIXES)} files (hidden folders are skipped); check the "
                     "folder's path")
        return line

    def problems(self) -> list[str]:
        """A line per asset that was skipped or indexed without its texture (its thumbnails and
        references then show flat colours), with the reason."""
        return ([f"skipped {path}: {why}" for path, why in self.skipped.items()]
                + [f"{path} indexed in flat colours: {why}: put the file there and index again"
                   for path, why in self.untextured.items()])


@dataclass
class Hit:
    library: Path
    entry: Entry
    score: float
    thumbnails: np.ndarray   # (V, S, S, 3) uint8, top row first

    @property
    def file(self) -> Path:
        return self.library / self.entry.path


class LibraryIndex:
    def __init__(self, root: Path, embedder: str, clip: str | None, entries: list[Entry], text: np.ndarray,
                 thumbnails: np.ndarray, images: np.ndarray | None, skipped: dict[str, dict]) -> None:
        self.root, self.embedder, self.clip = root, embedder, clip
        self.entries, self.text, self.thumbnails, self.images = entries, text, thumbnails, images
        self.skipped = skipped   # path → {"size", "mtime_ns", "reason"}
        self._ann = None

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def load(cls, root: Path) -> "LibraryIndex | None":
        """The stored index of ``root``, or None when there is none (or it is from another format)."""
        from safetensors import safe_open

        path = root / INDEX_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), framework="np") as f:
            meta = json.loads(f.metadata()["kiln"])
            if meta.get("format") != FORMAT:
                return None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(root, meta["embedder"], meta.get("clip"), [Entry(**e) for e in meta["entries"]],
                   tensors["text"], tensors["thumbnails"], tensors.get("images"), meta.get("skipped", {}))

    def save(self) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        meta = {"format": FORMAT, "embedder": self.embedder, "clip": self.clip,
                "entries": [asdict(e) for e in self.entries], "skipped": self.skipped}
        tensors = {"text": np.ascontiguousarray(self.text, np.float32),
                   "thumbnails": np.ascontiguousarray(self.thumbnails, np.uint8)}
        if self.images is not None:
            tensors["images"] = np.ascontiguousarray(self.images, np.float32)
        tmp = self.root / (INDEX_FILE + ".tmp")
        try:
            save_file(tensors, str(tmp), metadata={"kiln": json.dumps(meta)})
            os.replace(tmp, self.root / INDEX_FILE)  # a crash mid-write leaves the old index whole
        except (OSError, SafetensorError) as exc:  # safetensors' own writer raises its own type for I/O errors
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).split(": ", 1)[-1]
            raise MeshError(f"cannot write the library index in {str(self.root)!r} ({why}): make the folder "
                            "writable, or copy the assets to a folder you own") from None

    def text_scores(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k rows nearest ``query`` (a unit vector) by cosine, best first."""
        k = min(k, len(self))
        if k == 0:
            return []
        if len(self) <= EXACT_LIMIT:
            scores = self.text @ query
            top = np.argpartition(-scores, k - 1)[:k]
            return sorted(((int(i), float(scores[i])) for i in top), key=lambda p: -p[1])
        if self._ann is None:
            self._ann = self._load_ann()
        found = self._ann.search(query.astype(np.float32), k)
        return [(int(key), 1.0 - float(dist)) for key, dist in zip(found.keys, found.distances, strict=True)]

    def _load_ann(self):
        from usearch.index import Index

        path = self.root / ANN_FILE
        if path.is_file():
            index = Index.restore(str(path), view=True)
            if index is not None and len(index) == len(self):
                return index
        return ann_index(self.text)  # missing or stale (the folder was copied without it): rebuild

    def save_ann(self) -> None:
        """Write the HNSW graph for a large library, or remove a stale one from a small library."""
        path = self.root / ANN_FILE
        if len(self) > EXACT_LIMIT:
            self._ann = ann_index(self.text)
            self._ann.save(str(path))
        elif path.exists():
            path.unlink()


def ann_index(vectors: np.ndarray):
    """usearch's HNSW over unit vectors (cosine), keys = row numbers. Half precision: as accurate
    as single on caption embeddings (bench/retrieval.py: recall@10 1.0 either way) and a quarter
    faster to build."""
    from usearch.index import Index

    index = Index(ndim=vectors.shape[1], metric="cos", dtype="f16", expansion_search=128)
    index.add(np.arange(len(vectors), dtype=np.uint64), np.ascontiguousarray(vectors, np.float32))
    return index


def caption_for(path: Path) -> str:
    """The artist's caption from ``<file>.txt`` beside the asset, else the file name in words
    ("old_barrel-02.glb" → "old barrel")."""
    sidecar = path.with_suffix(path.suffix + ".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text
    return protocol.name_words(path.stem)


def thumbnails(asset: Asset) -> np.ndarray:
    """(V, S, S, 3) uint8 renders of the asset from the thumbnail cameras."""
    cams = orbit(asset.mesh.positions, list(THUMB_AZIMUTHS), [THUMB_ELEVATION] * len(THUMB_AZIMUTHS),
                 asset.mesh.up_axis)
    with torch.no_grad():
        images, _ = asset.render(cams, THUMB_SIZE, background=1.0)
    return (images.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def asset_files(root: Path, suffixes: tuple[str, ...] = ASSET_SUFFIXES) -> list[Path]:
    """Every asset file under ``root`` (of ``suffixes``), hidden folders skipped, in a stable order."""
    files = [p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files)


def build_index(root: Path, embedder: TextEmbedder, clip: ClipEmbedder | None = None,
                progress: Callable[[int, int, str], None] = lambda done, total, what: None,
                cancelled: Callable[[], bool] = lambda: False) -> tuple[LibraryIndex, Report]:
    """Index ``root`` (incrementally, reusing an index made with the same embedders) and save it."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise MeshError(f"asset library {str(root)!r} is not a folder: pick the folder that holds your "
                        f"{', '.join(ASSET_SUFFIXES)} files")
    old = LibraryIndex.load(root)
    clip_name = clip.name if clip else None
    if old is not None and (old.embedder != embedder.name or old.clip != clip_name):
        old = None  # vectors from other embedders cannot be mixed with new ones
    previous = {e.path: (i, e) for i, e in enumerate(old.entries)} if old else {}
    report = Report()
    entries, text_rows, thumbs, images, skipped = [], [], [], [], {}
    new_rows: list[int] = []   # positions in ``entries`` whose caption needs embedding
    files = asset_files(root)
    for n, path in enumerate(files):
        if cancelled():
            raise InterruptedError("indexing cancelled")
        rel = path.relative_to(root).as_posix()
        stat = path.stat()
        progress(n, len(files), rel)
        known = previous.get(rel)
        if known and (known[1].size, known[1].mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            i, entry = known
            entries.append(entry)
            text_rows.append(old.text[i])
            thumbs.append(old.thumbnails[i])
            if old.images is not None:
                images.append(old.images[i])
            report.reused += 1
            continue
        was_bad = old.skipped.get(rel) if old else None
        if was_bad and (was_bad["size"], was_bad["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            skipped[rel] = was_bad
            report.skipped[rel] = was_bad["reason"]
            continue
        try:
            asset = load_asset(path)
            views = thumbnails(asset)
        except MeshError as exc:
            skipped[rel] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "reason": str(exc)}
            report.skipped[rel] = str(exc)
            continue
        (report.updated if known else report.added).append(rel)
        if asset.texture is None and (why := missing_texture(path)) is not None:
            report.untextured[rel] = why
        entries.append(Entry(rel, stat.st_size, stat.st_mtime_ns, caption_for(path)))
        text_rows.append(None)
        thumbs.append(views)
        if clip is not None:
            images.append(clip.images(torch.from_numpy(views).permute(0, 3, 1, 2).float() / 255).mean(0))
        new_rows.append(len(entries) - 1)
    report.removed = sorted(set(previous) - {e.path for e in entries})
    progress(len(files), len(files), "embedding captions")
    for row, vector in zip(new_rows, embedder.text([entries[r].caption for r in new_rows]), strict=True):
        text_rows[row] = vector
    index = LibraryIndex(
        root, embedder.name, clip_name, entries,
        np.stack(text_rows) if entries else np.zeros((0, embedder.dim), np.float32),
        np.stack(thumbs) if entries else np.zeros((0, len(THUMB_AZIMUTHS), THUMB_SIZE, THUMB_SIZE, 3), np.uint8),
        _unit_rows(np.stack(images)) if clip is not None and entries else None, skipped)
    index.save()
    index.save_ann()
    return index, report


def search(indexes: list[LibraryIndex], prompt: str, k: int, embedder: TextEmbedder,
           clip: ClipEmbedder | None = None) -> list[Hit]:
    """The k assets nearest ``prompt`` over every library: by caption, then — where the libraries
    carry CLIP image embeddings and CLIP is given — re-ranked by what the assets look like."""
    for index in indexes:
        if index.embedder != embedder.name:
            raise MeshError(f"the index of {str(index.root)!r} was made with {index.embedder}, not "
                            f"{embedder.name}: index the library again")
    query = embedder.text([prompt])[0]
    rerank = clip is not None and all(ix.images is not None and ix.clip == clip.name for ix in indexes)
    pool = k * RERANK_POOL if rerank else k
    hits = [(ix, row, score) for ix in indexes for row, score in ix.text_scores(query, pool)]
    hits.sort(key=lambda h: -h[2])
    hits = hits[:pool]
    if rerank:
        picture = clip.text([prompt])[0]
        hits = [(ix, row, float(ix.images[row] @ picture)) for ix, row, _ in hits]
        hits.sort(key=lambda h: -h[2])
    return [Hit(ix.root, ix.entries[row], score, ix.thumbnails[row]) for ix, row, score in hits[:k]]


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)
