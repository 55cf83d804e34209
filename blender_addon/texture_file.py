"""A finished texture's PNG, encoded and written on a worker thread.

Blender's ``Image.save`` encodes on the main thread: 1.7 s at 4096² for a photo-like texture,
the whole UI frozen at the end of every job. numpy and zlib release the GIL while they work, so
the UI keeps drawing while this runs; Blender then only reads the file back (0.3 s at 4096²).
Stdlib and numpy only, as Blender bundles no image library for Python.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit PNG of ``pixels`` ((H, W, 4) RGBA or (H, W, 3) RGB uint8, rows bottom-up as
    Blender holds them). Every row takes PNG's Up filter, one numpy subtraction, and zlib's
    fastest level: on photo-like textures that is as small as Blender's own PNGs (17.2 MB against
    18.5 MB at 4096²) in a third of its time."""
    height, width, channels = pixels.shape
    rows = np.ascontiguousarray(pixels[::-1]).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps modulo 256, as the filter is defined
    colour_type = {3: 2, 4: 6}[channels]  # RGB, RGBA
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)  # 8 bits, no interlace
    return (_PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1))
            + _chunk(b"IEND", b""))


def reserve(folder: Path, stem: str) -> Path:
    """A new file ``folder/stem.png`` (or ``stem_001.png``, ...), created empty at once (atomic,
    so two textures finishing together never take the same name), and never an earlier result,
    which may still be in use (kept material, undo history)."""
    folder.mkdir(parents=True, exist_ok=True)
    counter = 0
    while True:
        path = folder / (f"{stem}.png" if counter == 0 else f"{stem}_{counter:03d}.png")
        try:
            path.open("xb").close()
            return path
        except FileExistsError:
            counter += 1


class TextureFile:
    """One texture's PNG, made on a thread: ``data`` once ``done``, written into ``folder`` as
    ``path`` unless ``folder`` is None (the texture is to be packed into the .blend) or ``error``
    says why it could not be."""

    def __init__(self, rgba: np.ndarray, folder: Path | None, stem: str) -> None:
        self.folder, self.path = folder, None
        self.data = b""
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(rgba, stem), name="kiln-texture-file", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self, rgba: np.ndarray, stem: str) -> None:
        self.data = png_bytes(rgba)
        if self.folder is None:
            return
        path = part = None
        try:
            path = reserve(self.folder, stem)
            part = path.with_name(path.name + ".part")  # never a half-written PNG under the real name
            part.write_bytes(self.data)
            os.replace(part, path)
            self.path = path
        except OSError as error:  # a read-only share, a full disk, a file where the folder goes
            self.error = error
            for leftover in (path, part):
                if leftover is not None:
                    leftover.unlink(missing_ok=True)
