"""Shared fixtures. Nothing here reaches the network: the hub is forced offline, and Blender's
user folders and Kiln's own (``KILN_HOME``) live in temporary directories, so installing the
extension or setting up an environment touches nothing real."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "BLENDER_USER_RESOURCES" not in os.environ:
    # Kept referenced so that it is removed when the run ends (a run used to leave one behind).
    _BLENDER_USER = tempfile.TemporaryDirectory(prefix="kiln-blender-user-", ignore_cleanup_errors=True)
    os.environ["BLENDER_USER_RESOURCES"] = _BLENDER_USER.name
if "KILN_HOME" not in os.environ:  # what Kiln records for later sessions stays out of the real ~/.kiln
    _KILN_HOME = tempfile.TemporaryDirectory(prefix="kiln-home-", ignore_cleanup_errors=True)
    os.environ["KILN_HOME"] = _KILN_HOME.name

from backend import protocol  # noqa: E402

#: The backend's interpreter; the Blender tests can run under another bpy (4.2) whose environment
#: has no torch, so they may point at the backend environment instead.
BACKEND_PYTHON = os.environ.get("KILN_BACKEND_PYTHON", sys.executable)


class BackendServer:
    """A real ``python -m backend serve`` subprocess, started the way the add-on starts it."""

    def __init__(self, *python_path: Path) -> None:
        self.secret = protocol.new_secret()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (ROOT, *python_path))), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([BACKEND_PYTHON, "-m", "backend", "serve"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.proc.stdin.write(self.secret.encode() + b"\n")
        self.proc.stdin.flush()
        self.ready = json.loads(self.proc.stdout.readline())
        self.port = int(self.ready["port"])

    def connect(self, secret: str | None = None) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        protocol.client_handshake(sock, secret or self.secret)
        return sock

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def start_standing_backend(path: Path) -> tuple[subprocess.Popen, dict | None]:
    """``python -m backend serve --connection-file PATH`` as a person starts it in a terminal, with
    its ready line (None if it refused to start); stdin is closed, as it may be for a backend left
    running."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([BACKEND_PYTHON, "-m", "backend", "serve", "--connection-file", str(path)], cwd=ROOT,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    return proc, json.loads(line) if line else None


@pytest.fixture(scope="module")
def server() -> Iterator[BackendServer]:
    srv = BackendServer()
    yield srv
    srv.stop()


def cube_arrays(with_uvs: bool = True) -> dict[str, protocol.Array]:
    """A unit cube as the add-on would send it: 8 vertices, 12 triangles, 36 loops."""
    v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], "<f4")
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = np.array([(q[0], q[1], q[2]) for q in quads] + [(q[0], q[2], q[3]) for q in quads], "<i4")
    loops = np.arange(36, dtype="<i4").reshape(12, 3)
    arrays = {"positions": protocol.array("<f4", v.shape, v), "triangles": protocol.array("<i4", tris.shape, tris),
              "tri_loops": protocol.array("<i4", loops.shape, loops)}
    if with_uvs:
        rng = np.random.default_rng(0)
        uv = rng.uniform(0.05, 0.95, (36, 2)).astype("<f4")
        arrays["loop_uvs"] = protocol.array("<f4", uv.shape, uv)
    return arrays


def submit(sock: socket.socket, arrays: dict[str, protocol.Array] | None = None, **fields) -> None:
    job = {"prompt": "a wooden crate", "model": "tiny", "texture_size": 512, "steps": 1, "seed": 1,
           "loop_count": 36, "object": "Cube", **fields}
    protocol.send(sock, protocol.SUBMIT, job, cube_arrays() if arrays is None else arrays)


def read_until(sock: socket.socket, *types: str) -> list[protocol.Message]:
    """Messages up to and including the first of ``types``."""
    seen = []
    while True:
        msg = protocol.recv(sock)
        seen.append(msg)
        if msg.type in types:
            return seen
