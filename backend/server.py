"""The backend server Blender spawns: loopback only, authenticated, one GPU job at a time.

Threads: one accepts connections; each connection has a reader (requests) and a writer (its
outbox); one worker runs jobs from a FIFO queue. A protocol fault closes only the connection that
caused it. The process exits when its parent closes our stdin (Blender quit or crashed), so no
orphan keeps holding VRAM. Started by hand with a connection file instead, it has no parent to
follow: it keeps its loaded models across Blender sessions and stops on Ctrl+C or SIGTERM.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import protocol, unwrap
from .events import Cancelled, TextureEvents
from .gpu import device_label, gpu_problem
from .jobs import (
    JobError,
    JobRequest,
    ModelCache,
    describe_failure,
    init_texture_from_message,
    mesh_from_message,
    run_generate_job,
    run_index_job,
    run_search_job,
    run_texture_job,
)
from .mesh import MeshError
from .retrieve import asset_from_message

log = logging.getLogger("kiln.server")
AUTH_TIMEOUT_S = 10.0


class Outbox:
    """Ordered outgoing frames, where a newer droppable frame (a live texture) replaces an unsent
    older one with the same key: a slow client sees fewer previews, and the job never waits."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cv = threading.Condition()
        self.items: collections.deque[list[Any]] = collections.deque()
        self.pending: dict[Any, list[Any]] = {}
        self.closed = False
        self.dropped = 0
        self.thread = threading.Thread(target=self._write, name="kiln-outbox", daemon=True)
        self.thread.start()

    def put(self, msg_type: str, fields: dict[str, Any], arrays: dict[str, protocol.Array] | None = None,
            replace_key: Any = None) -> None:
        parts = protocol.encode(msg_type, fields, arrays)
        with self.cv:
            if self.closed:
                return
            entry = self.pending.get(replace_key) if replace_key is not None else None
            if entry is not None:
                entry[1] = parts
                self.dropped += 1
            else:
                entry = [replace_key, parts]
                self.items.append(entry)
                if replace_key is not None:
                    self.pending[replace_key] = entry
            self.cv.notify()

    def _write(self) -> None:
        while True:
            with self.cv:
                while not self.items and not self.closed:
                    self.cv.wait()
                if not self.items:
                    return
                key, parts = self.items.popleft()
                if key is not None:
                    self.pending.pop(key, None)
            try:
                for part in parts:
                    self.sock.sendall(part)
            except OSError:
                self.close()
                return

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.items.clear()
            self.pending.clear()
            self.cv.notify()

    def flush_and_close(self, timeout: float = 5.0) -> None:
        """Let queued frames (an error message, say) go out before the socket closes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.cv:
                if not self.items:
                    break
            time.sleep(0.01)
        self.close()


@dataclass
class Job:
    id: int
    conn: "Connection"
    request: JobRequest
    mesh: Any
    init_texture: Any
    reference: Any                  # the artist's reference object (asset, name), or None
    cancel: threading.Event = field(default_factory=threading.Event)
    loading: str | None = None      # the model the job waits on, while it loads
    answered: bool = False          # its DONE or ERROR is sent: there is only ever one
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, msg_type: str, fields: dict[str, Any]) -> None:
        """The job's one DONE or ERROR: a cancel answered during a model's load leaves the worker's
        own answer, once the load ends, unsent."""
        with self.lock:
            if self.answered:
                return
            self.answered = True
        self.conn.outbox.put(msg_type, {"job": self.id, **fields})

    def cancel_now(self) -> None:
        """Cancel; a job waiting on a model's load is answered at once rather than when the load
        ends (minutes, for a first download), and the load goes on, for whichever job wants it next."""
        self.cancel.set()
        if self.loading is not None:
            JobEvents(self).log(f"{self.loading} goes on loading in the backend, for the next job that uses it "
                                "(Stop the backend to end it)")
            self.answer(protocol.DONE, {"status": "cancelled", "seconds": 0.0})


class JobEvents(TextureEvents):
    """Engine events → protocol messages for the job's own client."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.start = time.monotonic()

    def _send(self, msg_type: str, fields: dict[str, Any], arrays=None, replace_key=None) -> None:
        self.job.conn.outbox.put(msg_type, {"job": self.job.id, **fields}, arrays, replace_key)

    def progress(self, done: int, total: int, phase: str) -> None:
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else None
        self._send(protocol.PROGRESS, {"done": done, "total": total, "phase": phase,
                                       "elapsed_s": round(elapsed, 3), "eta_s": None if eta is None else round(eta, 1)})

    def texture(self, rgba, final: bool) -> None:
        h, w, _ = rgba.shape
        data = rgba.numpy()
        self._send(protocol.TEXTURE, {"width": w, "height": h, "final": final},
                   {"rgba": protocol.array("|u1", (h, w, 4), data)},
                   replace_key=None if final else (self.job.id, "texture"))

    def uvs(self, loop_uvs: np.ndarray | None, corner_uvs: np.ndarray) -> None:
        if loop_uvs is None:
            return
        self._send(protocol.MESH, {"uv_map": protocol.UNWRAP_UV_MAP},
                   {"loop_uvs": protocol.array("<f4", loop_uvs.shape, np.ascontiguousarray(loop_uvs, "<f4"))})

    def tiles(self, tiles: list[list[int]]) -> None:
        self._send(protocol.MESH, {"uv_map": protocol.TILES_UV_MAP, "tiles": tiles})

    def points(self, positions: np.ndarray, colors: np.ndarray, sizes: np.ndarray) -> None:
        n = len(positions)
        self._send(protocol.POINTS, {"count": n},
                   {"positions": protocol.array("<f4", (n, 3), np.ascontiguousarray(positions, "<f4")),
                    "colors": protocol.array("|u1", (n, 3), np.ascontiguousarray(colors, np.uint8)),
                    "sizes": protocol.array("<f4", (n,), np.ascontiguousarray(sizes, "<f4"))},
                   replace_key=(self.job.id, "points"))

    def reference(self, file: str, score: float, yaw: float, thumbnails: np.ndarray) -> None:
        self._send(protocol.REFERENCE, {"file": file, "score": round(score, 4), "yaw": yaw},
                   {"thumbnails": protocol.array("|u1", thumbnails.shape, np.ascontiguousarray(thumbnails, np.uint8))})

    def hits(self, hits: list[dict[str, object]], thumbnails: np.ndarray) -> None:
        self._send(protocol.HITS, {"hits": hits},
                   {"thumbnails": protocol.array("|u1", thumbnails.shape, np.ascontiguousarray(thumbnails, np.uint8))})

    def generated(self, mesh) -> None:
        arrays = {"positions": np.ascontiguousarray(mesh.positions, "<f4"),
                  "triangles": np.ascontiguousarray(mesh.triangles, "<i4"),
                  "corner_uvs": np.ascontiguousarray(mesh.corner_uvs.reshape(-1, 2), "<f4")}
        self._send(protocol.OBJECT, {"name": mesh.name, "up_axis": mesh.up_axis},
                   {k: protocol.array(a.dtype.str, a.shape, a) for k, a in arrays.items()})

    def log(self, text: str) -> None:
        self._send(protocol.LOG, {"level": "info", "text": text})

    def cancelled(self) -> bool:
        return self.job.cancel.is_set() or self.job.conn.outbox.closed

    def loading(self, model: str | None) -> None:
        self.job.loading = model
        if model is not None and self.job.cancel.is_set():  # cancelled just before its load began
            self.job.cancel_now()


class Connection:
    def __init__(self, server: "Server", sock: socket.socket, peer: Any) -> None:
        self.server, self.sock, self.peer = server, sock, peer
        self.outbox = Outbox(sock)
        self.jobs: dict[int, Job] = {}

    def serve(self) -> None:
        try:
            if self._handshake():
                self._loop()
        except protocol.ConnectionClosed as exc:
            log.info("client %s left: %s", self.peer, exc)
        except protocol.ProtocolError as exc:
            log.warning("closing %s: %s", self.peer, exc)
            self.outbox.put(protocol.ERROR, {"code": exc.code, "message": str(exc)})
            self.outbox.flush_and_close()
        except OSError as exc:
            log.info("connection %s failed: %s", self.peer, exc)
        finally:
            for job in list(self.jobs.values()):
                job.cancel.set()
            self.outbox.close()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def _handshake(self) -> bool:
        nonce = protocol.new_nonce()
        self.outbox.put(protocol.HELLO, {"version": protocol.PROTOCOL_VERSION, "nonce": nonce})
        self.sock.settimeout(AUTH_TIMEOUT_S)
        try:
            msg = protocol.recv(self.sock, max_payload=0)
        except socket.timeout:
            raise protocol.ProtocolError(protocol.E_AUTH, "no authentication within 10 s") from None
        self.sock.settimeout(None)
        if msg.type != protocol.AUTH:
            raise protocol.ProtocolError(protocol.E_AUTH, f"expected {protocol.AUTH!r} first, got {msg.type!r}")
        if msg.get("version") != protocol.PROTOCOL_VERSION:
            raise protocol.ProtocolError(protocol.E_VERSION,
                                         f"client speaks protocol {msg.get('version')}, backend "
                                         f"{protocol.PROTOCOL_VERSION}: use the backend shipped with the add-on")
        if not protocol.digest_matches(self.server.secret, nonce, "client", msg.get("digest")):
            log.warning("refused %s: wrong secret", self.peer)
            raise protocol.ProtocolError(protocol.E_AUTH, "authentication failed: wrong secret")
        self.outbox.put(protocol.WELCOME, {
            "digest": protocol.auth_digest(self.server.secret, str(msg.get("nonce")), "server"),
            "pid": os.getpid(), "device": self.server.device})
        return True

    def _loop(self) -> None:
        while True:
            msg = protocol.recv(self.sock)
            try:
                if not self._handle(msg):
                    return
            except Exception as exc:  # a bug in handling one message must not drop the artist's connection
                log.error("handling %r from %s failed:\n%s", msg.type, self.peer, traceback.format_exc())
                self.outbox.put(protocol.ERROR, {
                    "tag": msg.get("tag"), "code": protocol.E_INTERNAL,
                    "message": f"the backend could not handle {msg.type!r} ({type(exc).__name__}: {exc}); this is "
                               "a bug in Kiln: the backend's log has the details"})

    def _handle(self, msg: protocol.Message) -> bool:
        """Act on one client message; False once the connection should end."""
        if msg.type == protocol.SUBMIT:
            self._submit(msg)
        elif msg.type == protocol.CANCEL:
            job_id = msg.get("job")
            job = self.jobs.get(job_id) if isinstance(job_id, int) else None  # unknown ids are already over
            if job:
                job.cancel_now()
        elif msg.type == protocol.PING:
            self.outbox.put(protocol.PONG, {"t": msg.get("t")})
        elif msg.type == protocol.UNLOAD:
            # A running job keeps its own reference, so dropping the cache is safe at any time;
            # the memory is freed when that job ends.
            names = self.server.models.unload()
            self.outbox.put(protocol.LOG, {"level": "info",
                                           "text": f"unloaded models: {', '.join(names) or 'none loaded'}"})
        elif msg.type == protocol.SHUTDOWN:
            log.info("shutdown requested by %s", self.peer)
            self.server.stop()
            return False
        else:
            self.outbox.put(protocol.ERROR, {"code": protocol.E_BAD_REQUEST,
                                             "message": f"a client may not send {msg.type!r}"})
        return True

    def _submit(self, msg: protocol.Message) -> None:
        job_id = next(self.server.ids)
        try:
            request = JobRequest.from_fields(msg.fields)
            texturing = request.task == protocol.TASK_TEXTURE
            mesh = mesh_from_message(msg) if texturing else None
            init_texture = init_texture_from_message(msg, mesh) if texturing else None
            reference = asset_from_message(msg) if request.task in (protocol.TASK_TEXTURE,
                                                                    protocol.TASK_GENERATE) else None
        except (JobError, MeshError) as exc:
            self.outbox.put(protocol.ERROR, {"job": job_id, "tag": msg.get("tag"),
                                             "code": getattr(exc, "code", protocol.E_BAD_MESH), "message": str(exc)})
            return
        job = Job(job_id, self, request, mesh, init_texture, reference)
        self.jobs[job_id] = job
        ahead = self.server.jobs.qsize() + int(self.server.running is not None)
        self.outbox.put(protocol.ACCEPTED, {"job": job_id, "tag": msg.get("tag"), "queue_position": ahead})
        running = self.server.running
        if running is not None and running.answered and (model := running.loading) is not None:
            JobEvents(job).progress(0, 1, f"waiting for {model} to finish loading (a cancelled job's)")
        self.server.jobs.put(job)


def software_versions() -> str:
    """What a bug report needs to know of the backend first: its Python, torch (and its CUDA) and
    diffusers, as Blender's Copy Diagnostics and ``python -m backend --version`` show them."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    parts.append(f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""))
    try:
        parts.append(f"diffusers {version('diffusers')}")
    except PackageNotFoundError:  # reported as far as it goes; never fail a start over it
        pass
    return ", ".join(parts)


class Server:
    def __init__(self, secret: str, port: int = 0) -> None:
        self.secret = secret
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.ids = itertools.count(1)
        self.models = ModelCache()
        self.stopping = threading.Event()
        self.running: Job | None = None  # the job on the GPU, for queue positions
        self.device = self.device_name()  # looked up once: the ready line and every welcome report it
        self.software = software_versions()

    @staticmethod
    def device_name() -> str:
        try:
            return device_label()
        except Exception:  # the device name is informational; never fail a start over it
            return "unknown"

    def serve_forever(self) -> None:
        threading.Thread(target=self._work, name="kiln-worker", daemon=True).start()
        self.listener.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                sock, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=Connection(self, sock, peer).serve, name=f"kiln-conn-{peer[1]}",
                             daemon=True).start()
        self.listener.close()

    def stop(self) -> None:
        self.stopping.set()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            self.running = job
            try:
                self._run(job)
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        if job.cancel.is_set():
            job.answer(protocol.DONE, {"status": "cancelled", "seconds": 0.0})
            return
        from .prior import ModelError
        request = job.request
        log.info("job %d: %s %r with %s (%s) from %s", job.id, request.task, request.prompt, request.model,
                 request.method, job.conn.peer)
        try:
            if request.task == protocol.TASK_GENERATE:
                run_generate_job(request, JobEvents(job), self.models, job.reference)
            elif request.task == protocol.TASK_INDEX:
                run_index_job(request, JobEvents(job))
            elif request.task == protocol.TASK_SEARCH:
                run_search_job(request, JobEvents(job))
            else:
                run_texture_job(request, job.mesh, JobEvents(job), self.models, job.init_texture, job.reference)
            job.answer(protocol.DONE, {"status": "finished", "seconds": round(time.monotonic() - started, 3)})
            log.info("job %d finished in %.1f s", job.id, time.monotonic() - started)
        except Cancelled:
            job.answer(protocol.DONE, {"status": "cancelled", "seconds": round(time.monotonic() - started, 3)})
            log.info("job %d cancelled", job.id)
        except (JobError, ModelError, MeshError) as exc:  # MeshError carries no code of its own
            job.answer(protocol.ERROR, {"code": getattr(exc, "code", protocol.E_BAD_MESH), "message": str(exc)})
            log.info("job %d refused: %s", job.id, exc)
        except Exception as exc:  # the server outlives any one job's failure
            job.answer(protocol.ERROR, describe_failure(exc, request.low_vram))
            log.error("job %d failed:\n%s", job.id, traceback.format_exc())
        finally:
            job.conn.jobs.pop(job.id, None)


def _exit_with_parent() -> None:
    """Block on stdin; EOF means the process that spawned us is gone."""
    try:  # the raw fd, not sys.stdin: a thread blocked in a buffered read aborts interpreter exit
        while os.read(sys.stdin.fileno(), 1 << 16):
            pass
    finally:
        log.info("parent closed stdin; exiting")
        unwrap.stop_children()  # os._exit runs no atexit hooks
        os._exit(0)


def serve(port: int = 0, connection_file: Path | None = None) -> int:
    """Entry point of ``python -m backend serve``: secret on stdin's first line, port on stdout.
    With ``connection_file``, the backend makes its own secret and writes both there instead."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="kiln-backend %(levelname)s %(message)s")
    if connection_file is None:
        # Blender's: it lives as long as Blender holds its stdin. A Ctrl+C in the terminal Blender was
        # started from reaches it too, and would end a job mid-way with a traceback whether or not
        # Blender goes; if Blender goes, the closed stdin ends the backend.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        secret = sys.stdin.readline().strip()
        if len(secret) < 32:
            print("kiln-backend: expected the session secret on stdin's first line (Blender passes it); "
                  "refusing to serve without one", file=sys.stderr)
            return 2
    else:
        secret = protocol.new_secret()
        if (other := _standing_at(connection_file)) is not None:
            print(f"kiln-backend: a backend already runs on port {other} with {connection_file}: stop it first, or "
                  "pass another --connection-file", file=sys.stderr)
            return 2
    try:
        server = Server(secret, port)
    except OSError as exc:
        print(f"kiln-backend: cannot listen on 127.0.0.1:{port} ({exc.strerror}): choose another --port, or 0 for "
              "any free one", file=sys.stderr)
        return 2
    if connection_file is not None:  # before the ready line, so whoever reads that finds the file
        try:
            protocol.write_connection_file(connection_file, server.port, secret, server.device, server.software)
        except OSError as exc:
            print(f"kiln-backend: cannot write the connection file {connection_file} ({exc.strerror}): pass "
                  "another --connection-file", file=sys.stderr)
            return 2
    print(json.dumps({"kiln": "listening", "port": server.port, "pid": os.getpid(),
                      "protocol": protocol.PROTOCOL_VERSION, "device": server.device,
                      "software": server.software, "gpu_problem": gpu_problem()}), flush=True)
    # Blender reads only that line: whatever a library (or a child, which inherits the descriptor)
    # wrote to stdout later would fill a pipe no one reads, and the backend would hang in the write.
    if sys.stdout is not None and sys.stderr is not None:  # pythonw has neither
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    log.info("listening on 127.0.0.1:%d", server.port)
    if problem := gpu_problem():  # in Blender's console (and Copy Diagnostics) or the standing backend's terminal
        log.warning(problem)
    unwrap.keep_spare()  # each job on a mesh without UVs then finds xatlas's child already started
    if connection_file is None:
        threading.Thread(target=_exit_with_parent, name="kiln-parent-watch", daemon=True).start()
        server.serve_forever()
        return 0
    log.info("wrote %s: in Blender, set Preferences > Add-ons > Kiln > Backend to 'Connect to a Running "
             "Backend' with this file. Ctrl+C stops the backend", connection_file)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(ValueError):  # the file is gone or unreadable: nothing to remove
            if protocol.read_connection_file(connection_file)["secret"] == secret:  # not a newer backend's file
                connection_file.unlink(missing_ok=True)
        log.info("stopped")
    return 0


def _standing_at(path: Path) -> int | None:
    """The port of the backend ``path`` names, if one answers there."""
    try:
        info = protocol.read_connection_file(path)
    except ValueError:
        return None
    try:
        socket.create_connection(("127.0.0.1", info["port"]), timeout=1).close()
    except OSError:
        return None
    return info["port"]
