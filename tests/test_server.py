"""The backend server as a real subprocess: authentication, faults, bad jobs, a tiny job, cancel."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BackendServer, cube_arrays, read_until, start_standing_backend, submit

from backend import protocol


def assert_still_serving(server: BackendServer) -> None:
    sock = server.connect()
    protocol.send(sock, protocol.PING, {"t": 1})
    assert protocol.recv(sock).type == protocol.PONG
    sock.close()


def test_listens_on_loopback_only(server: BackendServer) -> None:
    """The kernel's own table of listening sockets: the backend's port is bound to 127.0.0.1 and
    nothing else (no 0.0.0.0, no IPv6 wildcard)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        pytest.skip("reads Linux's /proc/net/tcp")
    listeners = []
    for table in tables:
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) == server.port:  # 0A: LISTEN
                listeners.append(address)
    assert listeners == ["0100007F"], listeners  # 127.0.0.1, little-endian hex
    assert_still_serving(server)


def test_wrong_secret_is_refused_and_server_keeps_serving(server: BackendServer) -> None:
    with pytest.raises(protocol.ProtocolError) as err:
        server.connect(secret=protocol.new_secret())
    assert err.value.code == protocol.E_AUTH
    assert "wrong secret" in str(err.value)
    assert_still_serving(server)


def test_unauthenticated_requests_are_refused(server: BackendServer) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert protocol.recv(sock).type == protocol.HELLO
    submit(sock)  # a job without authenticating first
    reply = protocol.recv(sock)
    assert reply.type == protocol.ERROR and reply.get("code") in (protocol.E_AUTH, protocol.E_FRAME_TOO_LARGE)
    assert_still_serving(server)


@pytest.mark.parametrize("raw, code", [
    (struct.pack("!4sIQ", protocol.MAGIC, 15, protocol.MAX_PAYLOAD_BYTES + 1) + b'{"type":"ping"}',
     protocol.E_FRAME_TOO_LARGE),
    (struct.pack("!4sIQ", protocol.MAGIC, 9, 0) + b"{not json", protocol.E_BAD_FRAME),
], ids=["oversized frame", "malformed header"])
def test_bad_frames_are_refused_without_killing_the_server(server: BackendServer, raw: bytes, code: str) -> None:
    sock = server.connect()
    sock.sendall(raw)
    reply = protocol.recv(sock)
    assert reply.type == protocol.ERROR and reply.get("code") == code
    assert_still_serving(server)


def test_disconnect_mid_frame_leaves_the_server_serving(server: BackendServer) -> None:
    sock = server.connect()
    sock.sendall(struct.pack("!4sIQ", protocol.MAGIC, 200, 1000) + b'{"type":')
    sock.close()
    time.sleep(0.2)
    assert_still_serving(server)


@pytest.mark.parametrize("fields, arrays, code, fragment", [
    ({"prompt": "   "}, None, protocol.E_BAD_REQUEST, "prompt is empty"),
    ({"prompt": "x", "lora": "a/b", "lora_weight": 5}, None, protocol.E_BAD_REQUEST, "LoRA weight 5 is out of range"),
    ({"prompt": "x", "lora_weight": 0.5}, None, protocol.E_BAD_REQUEST, "LoRA weight was given without a LoRA"),
    ({"prompt": "x", "controlnet": "a/b", "controlnet_weight": -1}, None, protocol.E_BAD_REQUEST,
     "ControlNet weight -1 is out of range: choose 0 to 2"),
    ({"prompt": "x", "controlnet_weight": 0.5}, None, protocol.E_BAD_REQUEST, "without a ControlNet"),
    ({"texture_size": 256}, None, protocol.E_BAD_REQUEST, "texture size 256 is out of range"),
    ({"texture_size": 8192}, None, protocol.E_BAD_REQUEST, "texture size 8192 is out of range"),
    ({"steps": 0}, None, protocol.E_BAD_REQUEST, "steps 0 is out of range"),
    ({"steps": protocol.MAX_STEPS + 1}, None, protocol.E_BAD_REQUEST, f"choose 1 to {protocol.MAX_STEPS}"),
    ({"seed": protocol.MAX_SEED + 1}, None, protocol.E_BAD_REQUEST, f"from 0 to {protocol.MAX_SEED}"),
    ({}, "nan", protocol.E_BAD_MESH, "NaN or infinite"),
    ({}, "no_faces", protocol.E_BAD_MESH, "has no faces"),
    ({"loop_count": "36"}, None, protocol.E_BAD_MESH, "loop_count '36' must be a whole number"),
    ({"loop_count": 20}, None, protocol.E_BAD_MESH, "loop indices do not fit its 20 loops"),
    ({"up_axis": "w"}, None, protocol.E_BAD_MESH, "up axis 'w' is not one of y, z"),
    ({"preset": ["quality"]}, None, protocol.E_BAD_REQUEST, "must be a preset's name"),
    ({"references": 5}, None, protocol.E_BAD_REQUEST, "references must be a list of paths"),
    ({"model": "no such model!"}, None, protocol.E_MODEL_NOT_FOUND, "unknown model"),
    ({"model": "someone/not-downloaded-model", "offline": True}, None, protocol.E_WEIGHTS_OFFLINE, "offline"),
])
def test_bad_jobs_get_clear_errors(server: BackendServer, fields, arrays, code, fragment) -> None:
    sock = server.connect()
    payload = cube_arrays()
    if arrays == "nan":
        pos = np.frombuffer(payload["positions"].data, "<f4").copy().reshape(-1, 3)
        pos[3, 1] = np.nan
        payload["positions"] = protocol.array("<f4", pos.shape, pos)
    elif arrays == "no_faces":
        payload["triangles"] = protocol.array("<i4", (0, 3), b"")
        payload["tri_loops"] = protocol.array("<i4", (0, 3), b"")
    submit(sock, payload, **fields)
    error = read_until(sock, protocol.ERROR, protocol.DONE)[-1]
    assert error.type == protocol.ERROR, error
    assert error.get("code") == code
    assert fragment in error.get("message")
    assert_still_serving(server)


def test_tiny_job_streams_progress_and_textures_in_order(server: BackendServer) -> None:
    sock = server.connect()
    submit(sock, cube_arrays(with_uvs=False), steps=2)
    msgs = read_until(sock, protocol.DONE, protocol.ERROR)
    assert msgs[-1].type == protocol.DONE and msgs[-1].get("status") == "finished", msgs[-1]
    types = [m.type for m in msgs]
    assert types[0] == protocol.ACCEPTED
    assert protocol.MESH in types and types.index(protocol.MESH) < types.index(protocol.TEXTURE)
    progress = [m for m in msgs if m.type == protocol.PROGRESS]
    done = [m.get("done") for m in progress]
    assert done == sorted(done) and done[-1] == progress[-1].get("total") > 0
    uvs = msgs[types.index(protocol.MESH)].arrays["loop_uvs"]
    assert uvs.shape == (36, 2)
    loop_uv = np.frombuffer(uvs.data, "<f4")
    assert ((loop_uv >= 0) & (loop_uv <= 1)).all()
    textures = [m for m in msgs if m.type == protocol.TEXTURE]
    final = textures[-1]
    assert final.get("final") and sum(m.get("final") for m in textures) == 1
    rgba = np.frombuffer(final.arrays["rgba"].data, np.uint8).reshape(512, 512, 4)
    assert rgba[..., 3].min() == 255 and rgba[..., :3].std() > 1.0  # not a flat fill


def test_cancel_stops_a_running_job_within_a_second(server: BackendServer) -> None:
    sock = server.connect()
    submit(sock, steps=50)
    accepted = protocol.recv(sock)
    while True:  # wait until it is really working
        msg = protocol.recv(sock)
        if msg.type == protocol.PROGRESS and msg.get("done", 0) > 0:
            break
    sent = time.monotonic()
    protocol.send(sock, protocol.CANCEL, {"job": accepted.get("job")})
    done = read_until(sock, protocol.DONE)[-1]
    assert done.get("status") == "cancelled"
    assert time.monotonic() - sent < 1.0


def test_queued_job_can_be_cancelled_before_it_starts(server: BackendServer) -> None:
    sock = server.connect()
    submit(sock, steps=50)
    first = protocol.recv(sock)
    submit(sock, steps=1)
    second = next(m for m in iter(lambda: protocol.recv(sock), None) if m.type == protocol.ACCEPTED)
    assert second.get("queue_position") >= 1
    protocol.send(sock, protocol.CANCEL, {"job": second.get("job")})
    protocol.send(sock, protocol.CANCEL, {"job": first.get("job")})
    statuses = {}
    while len(statuses) < 2:
        msg = protocol.recv(sock)
        if msg.type == protocol.DONE:
            statuses[msg.get("job")] = msg.get("status")
    assert statuses == {first.get("job"): "cancelled", second.get("job"): "cancelled"}


LOUD_PRIOR = """
import os
from backend.tiny_model import build_tiny_prior


def make(device, offline):
    print("x" * 300_000, flush=True)  # a library's print
    os.write(1, b"y" * 300_000)  # a C library's, or a child's, on the inherited descriptor
    return build_tiny_prior(device)
"""


def test_a_library_writing_to_stdout_does_not_hang_the_job(tmp_path) -> None:
    """Blender reads only the backend's ready line from stdout: 600 kB written there later filled
    the pipe, and the backend hung in the write with the job at "loading"."""
    (tmp_path / "loud_prior.py").write_text(LOUD_PRIOR)
    srv = BackendServer(tmp_path)
    try:
        sock = srv.connect()
        sock.settimeout(60)
        submit(sock, model="python:loud_prior:make")
        assert read_until(sock, protocol.DONE, protocol.ERROR)[-1].type == protocol.DONE
    finally:
        srv.stop()


SLOW_PRIOR = """
import time
from pathlib import Path

def make(device=None, offline=False):
    from backend.tiny_model import build_tiny_prior
    while not Path({go!r}).exists():  # a model's first download: minutes
        time.sleep(0.05)
    return build_tiny_prior(device)
"""


def test_a_cancel_while_the_model_loads_is_answered_at_once_and_the_load_serves_the_next_job(tmp_path) -> None:
    """A job is cancelled between steps, and none runs while its model loads: Esc during a first
    download held the job, and the panel, until the gigabytes were in."""
    go = tmp_path / "loaded"
    (tmp_path / "slow_prior.py").write_text(SLOW_PRIOR.format(go=str(go)))
    srv = BackendServer(tmp_path)
    try:
        sock = srv.connect()
        sock.settimeout(60)
        submit(sock, model="python:slow_prior:make")
        first = read_until(sock, protocol.PROGRESS)[-1]
        assert first.get("phase").startswith("loading model")
        protocol.send(sock, protocol.CANCEL, {"job": first.get("job")})
        answered = read_until(sock, protocol.DONE, protocol.ERROR)
        assert (answered[-1].type, answered[-1].get("status")) == (protocol.DONE, "cancelled")
        assert any("goes on loading in the backend" in m.get("text", "") for m in answered if m.type == protocol.LOG)
        submit(sock, model="python:slow_prior:make", steps=1)
        waiting = read_until(sock, protocol.PROGRESS)[-1]
        assert waiting.get("phase") == "waiting for python:slow_prior:make to finish loading (a cancelled job's)"
        go.touch()
        rest = read_until(sock, protocol.DONE, protocol.ERROR)
        assert (rest[-1].type, rest[-1].get("job"), rest[-1].get("status")) == \
            (protocol.DONE, waiting.get("job"), "finished")
        assert not [m for m in rest if m.type in (protocol.DONE, protocol.ERROR) and m.get("job") == first.get("job")]
    finally:
        srv.stop()


OLD_CARD = """
import torch

torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda *_: (6, 1)
torch.cuda.get_arch_list = lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
torch.cuda.get_device_name = lambda *_: "NVIDIA GeForce GTX 1080"
"""


def test_a_card_torch_has_no_kernels_for_is_named_in_the_ready_line_and_jobs_run_on_the_cpu(tmp_path) -> None:
    """The add-on's Backend panel shows the ready line's reason before any job runs slowly. The
    card is torch.cuda as a GTX 1080 shows it to a CUDA 12.8 build, set up by a sitecustomize."""
    (tmp_path / "sitecustomize.py").write_text(OLD_CARD)
    srv = BackendServer(tmp_path)
    try:
        assert srv.ready["device"] == "cpu"
        assert srv.ready["gpu_problem"].startswith("the NVIDIA GeForce GTX 1080 (compute capability 6.1) is not a card")
        sock = srv.connect()
        submit(sock)
        assert read_until(sock, protocol.DONE, protocol.ERROR)[-1].type == protocol.DONE
    finally:
        srv.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C is a console event on Windows, not a signal to send")
def test_backend_exits_when_its_parent_closes_stdin_and_not_on_the_terminals_ctrl_c() -> None:
    """Ctrl+C in the terminal Blender runs from reaches the backend too: it killed a job mid-way,
    with a traceback, whether or not Blender went."""
    srv = BackendServer()
    srv.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert_still_serving(srv)
    srv.proc.stdin.close()
    assert srv.proc.wait(timeout=10) == 0


def frozen_unwrapping(tmp_path: Path, monkeypatch) -> tuple[BackendServer, socket.socket, int, Path]:
    """A Blender backend whose job on a mesh without UVs has handed its xatlas child the mesh, with
    the child stopped (SIGSTOP) before it could start: the job's connection, the child's pid and
    folder."""
    tmp_path.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    srv = BackendServer()
    deadline = time.monotonic() + 60
    while not (spare := [(int(p.parent.name), Path(p.read_bytes().split(b"\0")[3].decode()))
                         for p in Path("/proc").glob("[0-9]*/cmdline") if str(tmp_path).encode() in p.read_bytes()
                         and b"backend.unwrap" in p.read_bytes()]):
        assert time.monotonic() < deadline, "the backend started no spare xatlas child"
        time.sleep(0.05)
    pid, folder = spare[0]
    os.kill(pid, signal.SIGSTOP)
    sock = srv.connect()
    submit(sock, cube_arrays(with_uvs=False))
    while not (folder / "mesh.npz").exists():
        assert time.monotonic() < deadline, "the job never handed its child the mesh"
        time.sleep(0.05)
    return srv, sock, pid, folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the child through /proc")
def test_a_backend_that_goes_mid_unwrap_leaves_no_copy_of_the_mesh(tmp_path, monkeypatch) -> None:
    """Blender quitting (stdin closed) or killing its backend mid-unwrap left xatlas's child running
    on, and its folder, holding a copy of the artist's mesh, in the temporary folder for good."""
    srv, sock, pid, folder = frozen_unwrapping(tmp_path / "quit", monkeypatch)
    try:
        srv.proc.stdin.close()
        assert srv.proc.wait(timeout=30) == 0
        assert not list(folder.parent.glob("kiln-unwrap-*"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    sock.close()
    srv, sock, pid, folder = frozen_unwrapping(tmp_path / "killed", monkeypatch)
    srv.proc.kill()  # nothing of the backend's runs: the child, once it finishes, tidies up itself
    srv.proc.wait(timeout=30)
    os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while left := list(folder.parent.glob("kiln-unwrap-*")):
        assert time.monotonic() < deadline, f"left behind: {[sorted(p.name for p in f.iterdir()) for f in left]}"
        time.sleep(0.1)
    sock.close()


def test_backend_refuses_to_serve_without_a_secret() -> None:
    import os

    from conftest import BACKEND_PYTHON, ROOT
    proc = subprocess.run([BACKEND_PYTHON, "-m", "backend", "serve"], cwd=ROOT, input=b"\n", capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert proc.returncode == 2
    assert b"secret" in proc.stderr


def test_unload_frees_the_cached_model(server: BackendServer) -> None:
    sock = server.connect()
    submit(sock, steps=1)
    assert read_until(sock, protocol.DONE, protocol.ERROR)[-1].type == protocol.DONE
    protocol.send(sock, protocol.UNLOAD)
    assert "unloaded models: tiny" in read_until(sock, protocol.LOG)[-1].get("text")
    protocol.send(sock, protocol.UNLOAD)
    assert "none loaded" in read_until(sock, protocol.LOG)[-1].get("text")


def test_shutdown_message_stops_the_backend() -> None:
    srv = BackendServer()
    sock = srv.connect()
    protocol.send(sock, protocol.SHUTDOWN)
    assert srv.proc.wait(timeout=10) == 0


def test_a_standing_backend_is_found_through_its_connection_file(tmp_path) -> None:
    """Started by hand, the backend makes its own secret and writes it with its port to a file only
    its user can read; it outlives its terminal's stdin, refuses a second backend on the same file,
    and removes the file when stopped."""
    path = tmp_path / "kiln" / "backend.json"
    proc, ready = start_standing_backend(path)
    try:
        info = protocol.read_connection_file(path)
        assert (info["port"], info["pid"]) == (ready["port"], proc.pid)
        if os.name == "posix":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        sock = socket.create_connection(("127.0.0.1", info["port"]), timeout=30)
        protocol.client_handshake(sock, info["secret"])
        protocol.send(sock, protocol.PING, {"t": 1})
        assert protocol.recv(sock).type == protocol.PONG
        sock.close()
        with pytest.raises(protocol.ProtocolError, match="wrong secret"):
            protocol.client_handshake(socket.create_connection(("127.0.0.1", info["port"]), timeout=30),
                                      protocol.new_secret())
        second, _ = start_standing_backend(path)
        assert second.wait(timeout=60) == 2 and f"already runs on port {info['port']}" in second.stderr.read()
        assert protocol.read_connection_file(path) == info
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not path.exists()
        path.write_text("")  # a file where the next backend's folder would go
        blocked, _ = start_standing_backend(path / "backend.json")
        assert blocked.wait(timeout=60) == 2 and "cannot write the connection file" in blocked.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_outbox_drops_stale_previews_instead_of_blocking_the_job() -> None:
    """A client that stops reading must not stall the job: putting frames never blocks, a newer
    preview replaces an unsent older one, and ordered messages keep their order around them."""
    from backend.server import Outbox

    job_side, client_side = socket.socketpair()
    job_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    outbox = Outbox(job_side)
    big = np.zeros((256, 256, 4), np.uint8)
    started = time.monotonic()
    for i in range(50):  # far more than the socket buffer holds while nobody reads
        big[0, 0, 0] = i
        outbox.put(protocol.TEXTURE, {"job": 1, "i": i, "final": False},
                   {"rgba": protocol.array("|u1", big.shape, big.copy())}, replace_key=(1, "texture"))
        outbox.put(protocol.PROGRESS, {"job": 1, "done": i})
    outbox.put(protocol.DONE, {"job": 1, "status": "finished"})
    assert time.monotonic() - started < 1.0  # the job never waited on the socket
    assert outbox.dropped > 40
    client_side.settimeout(10)
    received = read_until(client_side, protocol.DONE)
    progress = [m.get("done") for m in received if m.type == protocol.PROGRESS]
    previews = [m.get("i") for m in received if m.type == protocol.TEXTURE]
    assert progress == list(range(50))                  # ordered messages all arrive, in order
    assert previews == sorted(previews) and previews[-1] == 49 and len(previews) < 10
    outbox.close()


def test_a_bug_handling_one_message_is_reported_and_the_connection_lives(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected exception while reading a job (a bug, injected here) answers with an internal
    error naming the job's tag, and the same connection goes on serving: the artist's session is
    not dropped. A CANCEL with a malformed job id is ignored like an unknown one."""
    import threading

    from backend import server as server_module

    def bug(msg: protocol.Message) -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(server_module, "mesh_from_message", bug)
    srv = server_module.Server(protocol.new_secret())
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        protocol.client_handshake(sock, srv.secret)
        submit(sock, tag="Cube")
        error = protocol.recv(sock)
        assert error.type == protocol.ERROR and error.get("code") == protocol.E_INTERNAL
        assert error.get("tag") == "Cube"
        assert "RuntimeError: injected" in error.get("message") and "bug in Kiln" in error.get("message")
        protocol.send(sock, protocol.CANCEL, {"job": [1]})
        protocol.send(sock, protocol.PING, {"t": 2})
        assert protocol.recv(sock).type == protocol.PONG
        sock.close()
    finally:
        srv.stop()
