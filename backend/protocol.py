"""Kiln's wire protocol: the one definition shared by the Blender add-on and the backend.

Standard library only, because Blender's Python imports it too (the extension zip carries this
file inside its copy of ``backend/``).

A frame is ``MAGIC | header length (u32) | payload length (u64)``, then a UTF-8 JSON header, then
the payload. The header always has ``"type"``; bulk data (meshes, textures) travels as raw
little-endian arrays concatenated in the payload and described by ``header["arrays"]`` — never as
base64, which would cost a third more bytes and a slow decode in Blender.

Authentication is a mutual HMAC challenge: the secret itself never crosses the socket, so a
process that can connect to the loopback port but did not receive the secret over the backend's
stdin cannot drive the GPU. A backend started by hand (``serve --connection-file``) makes its own
secret and writes it, with its port, to a connection file only its user can read: whoever can read
that file may use it, as with Jupyter's kernels.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

PROTOCOL_VERSION = 4
MAGIC = b"KLN1"
PREFIX = struct.Struct("!4sIQ")
MAX_HEADER_BYTES = 1 << 20
#: Big enough for a 4096² RGBA8 texture (64 MiB) or a 1M-triangle mesh with per-corner UVs.
MAX_PAYLOAD_BYTES = 256 << 20

# Limits both sides enforce: Blender checks them before sending anything, the backend again.
MIN_TEXTURE_SIZE, MAX_TEXTURE_SIZE = 512, 4096
#: Iterations a job may ask for: SIR needs a dozen, SDS and SSD a thousand or more.
MAX_STEPS = 5000
MAX_GUIDANCE = 200.0
#: The largest seed: the generators that take it hold a signed 64-bit integer.
MAX_SEED = 2**63 - 1
#: Refining: how far the result may move from the texture (a fraction of the noise a blank start gets).
MIN_STRENGTH, MAX_STRENGTH = 0.05, 1.0
#: A LoRA's weight when fused: 1 as trained, less to soften it, negative to push away from it (as
#: "detail" LoRAs are used), past 1 at the risk of artefacts.
MIN_LORA_WEIGHT, MAX_LORA_WEIGHT = -2.0, 2.0
#: How strongly a depth ControlNet steers the views: 1 as trained, 0 not at all.
MIN_CONTROLNET_WEIGHT, MAX_CONTROLNET_WEIGHT = 0.0, 2.0
#: A mesh's ``up_axis``: Blender's is z; glTF's and most OBJ files' y.
UP_AXES = ("y", "z")
#: Above this, unwrapping and rasterising cost more than a texture can show (~1 texel per triangle).
MAX_TRIANGLES = 1_000_000

#: The UV map Kiln adds to a mesh that had none (MESH with "loop_uvs": the backend's unwrap).
UNWRAP_UV_MAP = "KilnUV"
#: The UV map Kiln adds to a mesh whose map lays faces out over several UV tiles (UDIM), which one
#: texture cannot hold apart: MESH with "tiles", [[u, v], ...], the tiles of the job's "uv_map" in
#: order (UDIM 1001 + u + 10 v). The map is a copy of that one with each face moved from its tile
#: into the tile's cell of the texture (``tile_cell``); the artist's map is left as it is.
TILES_UV_MAP = "KilnUDIM"
#: The gutter around each tile's cell, as a fraction of the cell, so mipmaps do not mix tiles.
TILE_MARGIN = 1 / 64


def udim_number(u: Any, v: Any) -> Any:
    """The UDIM number of UV tile (u, v), 1001 + u + 10 v, or 0 for a tile outside UDIM's ten
    columns; written in arithmetic alone, so it takes ints or whole numpy arrays alike."""
    return (1001 + u + 10 * v) * ((u >= 0) & (u < 10) & (v >= 0))


def tile_cell(index: int, count: int) -> tuple[float, float, float]:
    """Where tile ``index`` of ``count`` lies in one texture: (scale, du, dv), so that a UV (u, v)
    of a face in tile (tu, tv) goes to ((u - tu) * scale + du, (v - tv) * scale + dv). The cells
    fill a square grid row by row from v = 0. Both sides use it: the backend to texture the faces
    there, Blender to add the UV map that reads them there."""
    grid = math.isqrt(count - 1) + 1
    scale = (1 - 2 * TILE_MARGIN) / grid
    return scale, (index % grid + TILE_MARGIN) / grid, (index // grid + TILE_MARGIN) / grid


# Message types. Client → server: AUTH, SUBMIT, CANCEL, UNLOAD, SHUTDOWN, PING.
# Server → client: HELLO, WELCOME, ACCEPTED, PROGRESS, TEXTURE, MESH, POINTS, OBJECT, REFERENCE, HITS, LOG,
# ERROR, DONE, PONG. MESH carries a new UV map for the artist's mesh (UNWRAP_UV_MAP or TILES_UV_MAP);
# POINTS a generation preview (Gaussian centres, colours, radii); OBJECT a generated object's geometry
# (positions, triangles, corner UVs), before its textures; REFERENCE the asset a job warms up toward
# (file, score, yaw, thumbnails); HITS a search's nearest assets ("hits": file, caption, score each;
# "thumbnails" (K, V, S, S, 3) uint8).
HELLO = "hello"
AUTH = "auth"
WELCOME = "welcome"
SUBMIT = "submit"
ACCEPTED = "accepted"
PROGRESS = "progress"
TEXTURE = "texture"
MESH = "mesh"
POINTS = "points"
OBJECT = "object"
REFERENCE = "reference"
HITS = "hits"
LOG = "log"
ERROR = "error"
DONE = "done"
CANCEL = "cancel"
UNLOAD = "unload"
SHUTDOWN = "shutdown"
PING = "ping"
PONG = "pong"

MESSAGE_TYPES = frozenset(
    {HELLO, AUTH, WELCOME, SUBMIT, ACCEPTED, PROGRESS, TEXTURE, MESH, POINTS, OBJECT, REFERENCE, HITS, LOG, ERROR,
     DONE, CANCEL, UNLOAD, SHUTDOWN, PING, PONG}
)

# What a SUBMIT asks for (its "task" field): texture the mesh it carries, generate a new object,
# index asset libraries (its "libraries" field) so later jobs can retrieve references from them, or
# search them for the assets nearest its prompt (answered with HITS).
TASK_TEXTURE, TASK_GENERATE, TASK_INDEX, TASK_SEARCH = "texture", "generate", "index", "search"
#: A texturing or generating SUBMIT may carry the artist's own reference object: the same arrays as
#: the mesh ("positions", "triangles", "tri_loops", "loop_uvs", and "texture" RGBA8 rows bottom-up),
#: each name behind this prefix, with "reference_object" (its name), "reference_loop_count" and,
#: for an object without a texture, "reference_color" (sRGB, 0-1).
REFERENCE_PREFIX = "reference_"
#: A texturing SUBMIT that refines carries the texture to start from as "init_texture" (RGBA8 rows
#: bottom-up, read through the mesh's "loop_uvs"). For an object whose material slots show
#: different images or colours, it (and a reference object, behind REFERENCE_PREFIX) adds
#: "slot_sources", one per slot: {"texture": ARRAY, "uvs": ARRAY} (that slot's RGBA8 image and the
#: (loops, 2) <f4 UVs it is read through; the first image is "init_texture", or the reference's
#: "texture"), {"color": [r, g, b]} (sRGB, 0-1) or null; and "triangle_slots", each triangle's
#: slot as (T,) <i4. A slot whose image is tiled (UDIM) adds, after the slots, one texture source
#: per further tile its faces lie in, which those faces' "triangle_slots" name instead.
#: A refining SUBMIT may change some faces only (Blender's Only Selected Faces): it adds
#: PAINT_TRIANGLES, (T,) |u1, 1 for each triangle the job may repaint. The other triangles keep
#: the look the job starts from, texel for texel, and the views show it around the repainted ones.
PAINT_TRIANGLES = "paint_triangles"

# Error codes carried by ERROR messages (plain strings so nothing is ever unpickled).
E_AUTH = "auth_failed"
E_VERSION = "version_mismatch"
E_FRAME_TOO_LARGE = "frame_too_large"
E_BAD_FRAME = "bad_frame"
E_BAD_REQUEST = "bad_request"
E_BAD_MESH = "bad_mesh"
E_MODEL_NOT_FOUND = "model_not_found"
E_WEIGHTS_OFFLINE = "weights_offline"
E_OUT_OF_MEMORY = "out_of_memory"
E_JOB_FAILED = "job_failed"
E_INTERNAL = "internal"

#: dtype strings allowed in payload arrays (numpy's spelling, explicit little-endian).
DTYPE_SIZES = {"<f4": 4, "<f2": 2, "<i4": 4, "<u4": 4, "<i8": 8, "|u1": 1}


class ProtocolError(Exception):
    """A frame or message that breaks the protocol; ``code`` is one of the E_* strings."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectionClosed(Exception):
    """The peer went away; ``mid_frame`` tells a clean close from a cut-off frame."""

    def __init__(self, message: str, mid_frame: bool = False) -> None:
        super().__init__(message)
        self.mid_frame = mid_frame


@dataclass
class Array:
    """A raw array in a payload: dtype (numpy spelling), shape, and the bytes as a memoryview."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass
class Message:
    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Array] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _as_bytes_view(obj: Any) -> memoryview:
    view = memoryview(obj)
    if not view.c_contiguous:
        raise ValueError("payload arrays must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def array(dtype: str, shape: tuple[int, ...], data: Any) -> Array:
    """Describe a buffer (numpy array, array.array, bytes) for sending; checks its size."""
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPE_SIZES)}")
    view = _as_bytes_view(data)
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if view.nbytes != expected:
        raise ValueError(f"array of shape {shape} and dtype {dtype} needs {expected} bytes, got {view.nbytes}")
    return Array(dtype, tuple(int(s) for s in shape), view)


def encode(msg_type: str, fields: Mapping[str, Any] | None = None,
           arrays: Mapping[str, Array] | None = None) -> list[bytes | memoryview]:
    """Frame a message as a list of buffers, so large payloads are sent without a copy."""
    if msg_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {msg_type!r}")
    header: dict[str, Any] = dict(fields or {})
    header["type"] = msg_type
    arrays = dict(arrays or {})
    header["arrays"] = [{"name": n, "dtype": a.dtype, "shape": list(a.shape)} for n, a in arrays.items()]
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    payload_len = sum(a.data.nbytes for a in arrays.values())
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError(E_FRAME_TOO_LARGE, f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            E_FRAME_TOO_LARGE,
            f"payload of {payload_len / 2**20:.1f} MiB exceeds the {MAX_PAYLOAD_BYTES >> 20} MiB frame limit",
        )
    return [PREFIX.pack(MAGIC, len(head), payload_len), head, *(a.data for a in arrays.values())]


def send(sock: socket.socket, msg_type: str, fields: Mapping[str, Any] | None = None,
         arrays: Mapping[str, Array] | None = None) -> None:
    """Send one message; the caller serialises concurrent senders (one lock per socket)."""
    for part in encode(msg_type, fields, arrays):
        sock.sendall(part)


def _recv_exact(sock: socket.socket, n: int, started: bool) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 20))
        if k == 0:
            if got == 0 and not started:
                raise ConnectionClosed("connection closed by peer")
            raise ConnectionClosed(f"connection closed mid-frame ({got} of {n} bytes)", mid_frame=True)
        got += k
    return buf


def decode_header(raw: bytes | bytearray) -> dict[str, Any]:
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(E_BAD_FRAME, f"malformed frame header: {exc}") from None
    if not isinstance(header, dict) or header.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(E_BAD_FRAME, f"malformed frame header: missing or unknown type {header!r:.80}")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise ProtocolError(E_BAD_FRAME, "malformed frame header: 'arrays' must be a list")
    return header


def _split_payload(specs: list[Any], payload: memoryview) -> dict[str, Array]:
    arrays: dict[str, Array] = {}
    offset = 0
    for spec in specs:
        try:
            name, dtype, shape = spec["name"], spec["dtype"], tuple(int(s) for s in spec["shape"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(E_BAD_FRAME, f"malformed array description {spec!r:.80}") from None
        if dtype not in DTYPE_SIZES or any(s < 0 for s in shape):
            raise ProtocolError(E_BAD_FRAME, f"array {name!r}: bad dtype or shape")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offset + nbytes > payload.nbytes:
            raise ProtocolError(E_BAD_FRAME, f"array {name!r} runs past the end of the payload")
        arrays[name] = Array(dtype, shape, payload[offset:offset + nbytes])
        offset += nbytes
    if offset != payload.nbytes:
        raise ProtocolError(E_BAD_FRAME, f"payload has {payload.nbytes - offset} bytes no array describes")
    return arrays


def recv(sock: socket.socket, max_payload: int = MAX_PAYLOAD_BYTES) -> Message:
    """Read one message. Oversized or malformed frames raise ProtocolError before the payload is read."""
    prefix = _recv_exact(sock, PREFIX.size, started=False)
    magic, head_len, payload_len = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ProtocolError(E_BAD_FRAME, f"bad frame magic {bytes(magic)!r}: not a Kiln peer, or a protocol mismatch")
    if head_len > MAX_HEADER_BYTES:
        raise ProtocolError(E_FRAME_TOO_LARGE, f"frame header of {head_len} bytes exceeds {MAX_HEADER_BYTES}")
    if payload_len > max_payload:
        raise ProtocolError(
            E_FRAME_TOO_LARGE,
            f"frame payload of {payload_len / 2**20:.1f} MiB exceeds the {max_payload >> 20} MiB limit",
        )
    header = decode_header(_recv_exact(sock, head_len, started=True))
    payload = memoryview(_recv_exact(sock, payload_len, started=True)) if payload_len else memoryview(b"")
    arrays = _split_payload(header.pop("arrays", []), payload)
    msg_type = header.pop("type")
    return Message(msg_type, header, arrays)


# --- authentication -------------------------------------------------------------------------

def new_secret() -> str:
    return secrets.token_hex(32)


def new_nonce() -> str:
    return secrets.token_hex(16)


def auth_digest(secret: str, nonce: str, role: str) -> str:
    """HMAC proof that the sender holds ``secret``; ``role`` stops a reflected proof from passing."""
    return hmac.new(secret.encode("ascii"), f"{role}:{nonce}".encode("ascii"), hashlib.sha256).hexdigest()


def digest_matches(secret: str, nonce: str, role: str, digest: Any) -> bool:
    return isinstance(digest, str) and hmac.compare_digest(auth_digest(secret, nonce, role), digest)


def client_handshake(sock: socket.socket, secret: str, client_name: str = "kiln") -> Message:
    """Authenticate to a server and check that it holds the secret too; returns its WELCOME."""
    hello = recv(sock)
    if hello.type == ERROR:
        raise ProtocolError(hello.get("code", E_AUTH), hello.get("message", "server refused the connection"))
    if hello.type != HELLO:
        raise ProtocolError(E_BAD_FRAME, f"expected {HELLO!r}, got {hello.type!r}")
    if hello.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(
            E_VERSION,
            f"backend speaks protocol {hello.get('version')}, this add-on {PROTOCOL_VERSION}: "
            "restart the backend from the add-on so both come from the same Kiln version",
        )
    my_nonce = new_nonce()
    send(sock, AUTH, {"version": PROTOCOL_VERSION, "client": client_name, "nonce": my_nonce,
                      "digest": auth_digest(secret, str(hello.get("nonce")), "client")})
    reply = recv(sock)
    if reply.type == ERROR:
        raise ProtocolError(reply.get("code", E_AUTH), reply.get("message", "authentication failed"))
    if reply.type != WELCOME or not digest_matches(secret, my_nonce, "server", reply.get("digest")):
        raise ProtocolError(E_AUTH, "the process on this port could not prove it is the backend Kiln started")
    return reply


# --- names both sides give generated objects ----------------------------------------------------

def prompt_words(prompt: str, count: int = 3) -> list[str]:
    """The first words of a prompt's first clause, articles dropped ("a red chair, ornate" → red,
    chair): one rule for the name of a generated object, in Blender ("Kiln red chair") and in the
    CLI's file names ("red_chair")."""
    words = re.findall(r"[^\W_]+", prompt.split(",")[0])
    return [w for w in words if w.lower() not in ("a", "an", "the")][:count]


def name_words(name: str) -> str:
    """A file, object or asset name as words, letters in any script and nothing else
    ("OldBarrel_02.001" → "old barrel", "my vase (1)" → "my vase"): one rule for the captions of
    asset files (backend) and of .blend assets (Blender)."""
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return " ".join(re.sub(r"[\W\d_]+", " ", words).lower().split()) or name


# --- connection files (a backend started outside Blender) ---------------------------------------

def user_folder() -> Path:
    """Where Kiln keeps what outlives a session (the environment's record, connection files, the
    LoRA cache): ~/.kiln, or $KILN_HOME (tests point it at a temporary folder)."""
    return Path(os.environ.get("KILN_HOME") or Path.home() / ".kiln")


def default_connection_file() -> Path:
    return user_folder() / "backend.json"


def write_connection_file(path: Path, port: int, secret: str, device: str, software: str = "") -> None:
    """Readable by this user only, and whole or absent: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"kiln": "backend", "protocol": PROTOCOL_VERSION, "port": port, "secret": secret,
                   "pid": os.getpid(), "device": device, "software": software}, fh)
    os.replace(partial, path)


def read_connection_file(path: Path) -> dict[str, Any]:
    """The port, secret, pid and device a running backend wrote; ValueError naming the fix when
    there is none or it is not one."""
    start = "start one with `python -m backend serve --connection-file` in the backend's environment"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no backend is running outside Blender: {path} does not exist; {start}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the backend's connection file {path} ({exc}); {start}") from None
    if not isinstance(info, dict) or info.get("kiln") != "backend" or not isinstance(info.get("port"), int) \
            or not isinstance(info.get("secret"), str):
        raise ValueError(f"{path} is not a Kiln backend's connection file; {start}")
    return info
