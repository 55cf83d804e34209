"""UV unwrapping with xatlas, bounded in time and kept out of the backend's process.

xatlas's cost grows faster than the face count (a rough 82k-face sphere takes 34 s in one piece on
two cores), and on some inputs it crashes the process outright (a perfect 82k-face icosphere
segfaults xatlas 0.0.10 and 0.0.11; see jpcy/xatlas#151 for others). So it runs in a child
process that the job waits on with a deadline and the cancel flag: a crash, a cancel or a mesh too
big for the time limit costs the job, never the server or the artist's scene. Meshes above
``SINGLE_PIECE_FACES`` go in as spatial pieces of about ``PIECE_FACES`` faces, which xatlas charts
in parallel (one task per piece) and packs into one atlas; the pieces add seams only where a cut
crosses the surface, one per piece at most.

Run as ``python -m backend.unwrap FOLDER``: the child imports numpy and xatlas only (torch's import
alone took longer than unwrapping a 50k-face mesh), so nothing this module imports may pull torch in;
then it waits for a line on stdin before it reads ``FOLDER/mesh.npz`` and writes ``FOLDER/uvs.npy``,
and waits on stdin again until its backend, done with the UVs, stops it.
Starting Python and those imports cost about a second on the GPU machine (5k and 50k faces both took
1.1 s there, 2026-12-04), so a long-lived backend keeps one child started ahead (``keep_spare``) and
a job only writes its mesh and says go.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .mesh import Mesh, MeshError

SINGLE_PIECE_FACES = 20_000  # below this one piece is fast enough (≈ 4 s) and has the fewest seams
# A rough 328k-face sphere on 2 cores: 64 pieces 41 s, 128 31 s, 256 21 s, 512 14 s; smaller pieces
# are faster still but each adds a chart (seams), so about a thousand faces each.
PIECE_FACES = 1_000
TIME_LIMIT_S = 60.0
# The child yields the CPU to the job, which loads the model meanwhile: at equal priority their
# threads oversubscribe the cores. SD 1.5 loaded on 2 cores beside a 50k-face unwrap: 2.2-2.6 s one
# after the other, 3.9-4.2 s side by side, 2.1-2.3 s side by side with the child niced.
NICENESS = 10
UVS = "uvs.npy"  # the child's answer in its folder, put there whole (a rename) when it is ready


def split_faces(centroids: np.ndarray, piece_faces: int) -> list[np.ndarray]:
    """Face indices in spatial pieces of at most ``piece_faces``: halve the largest piece at the
    median of its longest axis until all fit, so pieces stay compact (short cuts, few seams)."""
    pieces, done = [np.arange(len(centroids))], []
    while pieces:
        piece = pieces.pop()
        if len(piece) <= piece_faces:
            done.append(piece)
            continue
        points = centroids[piece]
        axis = int(np.argmax(points.max(0) - points.min(0)))
        order = piece[np.argsort(points[:, axis], kind="stable")]
        half = len(order) // 2
        pieces += [order[:half], order[half:]]
    return done


def mesh_pieces(mesh: Mesh) -> list[np.ndarray]:
    """The face indices xatlas gets as separate meshes: all in one up to ``SINGLE_PIECE_FACES``."""
    if mesh.triangle_count <= SINGLE_PIECE_FACES:
        return [np.arange(mesh.triangle_count)]
    return split_faces(mesh.positions[mesh.triangles].mean(1), PIECE_FACES)


def xatlas_positions(positions: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """The positions scaled so that the median edge is 1 long: xatlas drops edges shorter than 1e-4
    and faces under float epsilon in area as degenerate, in absolute units, so a bead modelled in
    metres (2 mm across) came back with no charts and NaN UVs. Its charting is otherwise blind to
    scale, and at this one only faces that are degenerate next to their neighbours fall below the
    thresholds."""
    edges = np.linalg.norm(positions[triangles] - positions[np.roll(triangles, 1, axis=1)], axis=-1)
    edges = edges[edges > 0]
    median = float(np.median(edges)) if len(edges) else 0.0
    return (positions / median if median > 0 else positions).astype(np.float32)


def _parametrize(positions: np.ndarray, triangles: np.ndarray, pieces: list[np.ndarray]) -> np.ndarray:
    """Corner UVs (T, 3, 2) of all pieces in one xatlas atlas (the child's work)."""
    import xatlas

    atlas = xatlas.Atlas()
    positions = xatlas_positions(positions, triangles)
    for piece in pieces:
        used, local = np.unique(triangles[piece], return_inverse=True)
        atlas.add_mesh(positions[used], local.reshape(-1, 3).astype(np.uint32))
    atlas.generate()
    corner = np.zeros((len(triangles), 3, 2), np.float32)
    for i, piece in enumerate(pieces):
        _, indices, uvs = atlas[i]
        corner[piece] = uvs[indices.astype(np.int64)]
    return corner


def _child(folder: str) -> None:
    """A backend that goes without a word (killed, crashed, Windows or POSIX alike) closes the
    child's stdin with its own end of the pipe: waiting for the go, or with the UVs written, the
    child then finds EOF, and removes its folder (a copy of the artist's mesh), as no one else will.
    A backend that is still there stops the child itself, once it has read the UVs."""
    if hasattr(os, "nice"):  # POSIX; on Windows the parent starts the child at below-normal priority
        os.nice(NICENESS)
    import xatlas  # noqa: F401  (now, so that a spare has paid for it before its job comes)

    if not sys.stdin.readline():  # a spare whose backend went
        _remove_own_folder(folder)
        return
    data = np.load(Path(folder) / "mesh.npz")
    triangles = data["triangles"]
    bounds = data["bounds"]
    pieces = [data["order"][a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    uvs = _parametrize(data["positions"], triangles, pieces)
    partial = Path(folder) / "uvs.partial.npy"
    with open(partial, "wb") as out:
        np.save(out, uvs)
    os.replace(partial, Path(folder) / UVS)  # whole, or not there: the backend reads it
    sys.stdin.readline()  # EOF, the backend gone: only ever reached then (it stops a child it is reading)
    _remove_own_folder(folder)


def _remove_own_folder(folder: str) -> None:
    """What a child whose backend has gone does: remove its folder, as no one else will."""
    os.close(2)  # the one open handle on the folder's stderr.txt (Windows deletes no open file)
    shutil.rmtree(folder, ignore_errors=True)


class _Child:
    """A started child with its own folder, waiting on stdin for the go."""

    def __init__(self) -> None:
        self.folder = tempfile.TemporaryDirectory(prefix="kiln-unwrap-")
        folder = Path(self.folder.name)
        self.source, self.target, self.errors = folder / "mesh.npz", folder / UVS, folder / "stderr.txt"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
        with open(self.errors, "wb") as errors:  # a file, not a pipe: a chatty child never blocks on it
            self.process = subprocess.Popen([sys.executable, "-m", "backend.unwrap", str(folder)],
                                            env=env,
                                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors,
                                            creationflags=getattr(subprocess, "BELOW_NORMAL_PRIORITY_CLASS", 0))
        with _live_lock:
            _live.add(self)

    def close(self) -> None:
        if self.process.poll() is None:  # killed before its stdin closes, so it leaves the folder to us
            self.process.kill()
        self.process.wait()
        with contextlib.suppress(OSError):  # a "go" still buffered for a child that died: nothing to tell
            self.process.stdin.close()
        self.folder.cleanup()
        with _live_lock:
            _live.discard(self)


_spare: _Child | None = None
_keeping = False
_lock = threading.Lock()
#: Every child not yet closed, the spare and those at work: ``stop_children`` ends them all.
_live: set[_Child] = set()
_live_lock = threading.Lock()


def keep_spare() -> None:
    """From now on keep one child started ahead of the next job (the server calls this; a one-job
    CLI run starts its child while the model loads, which hides the start anyway)."""
    global _keeping, _spare
    with _lock:
        if not _keeping:
            atexit.register(stop_children)
        _keeping = True
        if _spare is None:
            _spare = _Child()


def discard_spare() -> None:
    """Stop the spare child (backend exit); a spare also exits by itself when its stdin closes."""
    global _keeping, _spare
    with _lock:
        _keeping = False
        if _spare is not None:
            _spare.close()
            _spare = None


def stop_children() -> None:
    """Stop every child, the spare and those at work, and remove their folders: the backend is going
    (Blender closed its stdin, or a standing backend's Ctrl+C), and a child at work would run on
    and leave its folder, a copy of the mesh, behind with no one to read or remove it."""
    global _keeping, _spare
    with _lock:
        _keeping, _spare = False, None
    with _live_lock:
        children = list(_live)
    for child in children:
        child.close()


def _take_child() -> _Child:
    """The spare if one is alive (and another started for the next job), else a new child."""
    global _spare
    with _lock:
        child, _spare = _spare, None
        if child is not None and child.process.poll() is not None:
            child.close()
            child = None
        if _keeping:
            _spare = _Child()
    return child or _Child()


class Unwrapping:
    """xatlas at work on one mesh in its child process, started on construction so that the job
    can load the model and start its method meanwhile (a first job's model load takes seconds, as
    does unwrapping a big mesh); ``corner_uvs`` or ``apply`` waits for it. Use it as a context
    manager: leaving kills a child still running (a failed model load, a cancel) and removes its
    files."""

    def __init__(self, mesh: Mesh, time_limit: float = TIME_LIMIT_S) -> None:
        self.mesh, self.time_limit = mesh, time_limit
        pieces = mesh_pieces(mesh)
        self.worker = _take_child()
        self.child = self.worker.process
        np.savez(self.worker.source, positions=mesh.positions.astype(np.float32),
                 triangles=mesh.triangles.astype(np.int64), order=np.concatenate(pieces),
                 bounds=np.cumsum([0] + [len(p) for p in pieces]))
        try:  # stdin stays open: its end is the child's sign that the backend is gone
            self.child.stdin.write(b"go\n")
            self.child.stdin.flush()
        except OSError:  # the child died before its go; corner_uvs reports how
            pass
        self.deadline = time.monotonic() + time_limit

    def __enter__(self) -> "Unwrapping":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def done(self) -> bool:
        """Whether the child has finished: its UVs are written, or it has ended without them."""
        return self.worker.target.exists() or self.child.poll() is not None

    def close(self) -> None:
        self.worker.close()

    def corner_uvs(self, cancelled: Callable[[], bool] = lambda: False) -> np.ndarray:
        """xatlas's UVs per triangle corner, (T, 3, 2). Raises ``Cancelled`` when ``cancelled()``
        turns True, and MeshError (with the fix) when xatlas crashes or runs past the time limit
        (counted from the start)."""
        from .events import Cancelled  # imports torch: only the parent needs it

        faces, name = self.mesh.triangle_count, self.mesh.name
        fix = ("give it a UV map in Blender (UV Editing > UV > Smart UV Project) or reduce it (Decimate modifier), "
               "then run again")
        while not self.worker.target.exists():
            try:
                self.child.wait(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                if cancelled():
                    raise Cancelled() from None
                if time.monotonic() > self.deadline:
                    raise MeshError(f"unwrapping mesh {name!r} ({faces:,} triangles, no UV map) took over "
                                    f"{self.time_limit:g} s, so Kiln stopped it: {fix}") from None
        if not self.worker.target.exists():  # ended without its UVs
            errors = self.worker.errors.read_text(errors="replace").strip()
            how = f"crashed (signal {-self.child.returncode})" if self.child.returncode < 0 else "failed"
            detail = f" ({errors.splitlines()[-1]})" if errors else ""
            raise MeshError(f"xatlas {how} unwrapping mesh {name!r} ({faces:,} triangles){detail}: {fix}")
        uvs = np.load(self.worker.target)
        self.close()  # read: the child, which waits for its end of stdin, goes now rather than with the job
        if not np.isfinite(uvs).all():  # xatlas found no face with area to chart
            raise MeshError(f"mesh {name!r} has no faces with area for xatlas to unwrap: merge its duplicate "
                            "vertices (Edit Mode > Mesh > Clean Up > Merge by Distance) or give it a UV map")
        return uvs

    def apply(self, cancelled: Callable[[], bool] = lambda: False) -> np.ndarray | None:
        """Give the mesh its UVs; sets ``corner_uvs`` and returns per-loop UVs (or None).

        The per-loop array is what Blender stores in the new UV map. Where an n-gon's loops got
        different UVs in different triangles, the last one wins and the corners are re-read from
        the loop array, so the texture is baked for the UVs Blender will actually use.
        """
        mesh, corner = self.mesh, self.corner_uvs(cancelled)
        if mesh.tri_loops is None:
            mesh.corner_uvs = corner
            return None
        loop_uv = np.zeros((mesh.loop_count, 2), np.float32)
        loop_uv[mesh.tri_loops.reshape(-1)] = corner.reshape(-1, 2)
        mesh.corner_uvs = loop_uv[mesh.tri_loops]
        return loop_uv


def unwrap(mesh: Mesh, cancelled: Callable[[], bool] = lambda: False,
           time_limit: float = TIME_LIMIT_S) -> np.ndarray | None:
    """``Unwrapping.apply`` for a mesh, start to finish."""
    with Unwrapping(mesh, time_limit) as unwrapping:
        return unwrapping.apply(cancelled)


if __name__ == "__main__":
    _child(sys.argv[1])
