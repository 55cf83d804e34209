"""The wire protocol on its own: round trips, limits, malformed input, authentication."""

from __future__ import annotations

import array
import json
import socket
import struct
import threading

import numpy as np
import pytest

from backend import protocol


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


@pytest.mark.parametrize("msg_type", sorted(protocol.MESSAGE_TYPES))
def test_every_message_round_trips_with_arrays(msg_type: str) -> None:
    a, b = pair()
    rgba = np.arange(4 * 3 * 4, dtype=np.uint8).reshape(4, 3, 4)
    uv = array.array("f", [0.25, 0.5, 0.75, 1.0])
    fields = {"job": 7, "text": "ünïcode ✓", "nested": {"x": [1, 2.5, None]}}
    sender = threading.Thread(target=protocol.send, args=(a, msg_type, fields, {
        "rgba": protocol.array("|u1", rgba.shape, rgba), "uv": protocol.array("<f4", (2, 2), uv)}))
    sender.start()
    msg = protocol.recv(b)
    sender.join()
    assert msg.type == msg_type
    assert msg.fields == fields
    assert np.array_equal(np.frombuffer(msg.arrays["rgba"].data, np.uint8).reshape(4, 3, 4), rgba)
    assert msg.arrays["uv"].shape == (2, 2)
    assert list(np.frombuffer(msg.arrays["uv"].data, "<f4")) == [0.25, 0.5, 0.75, 1.0]


def test_array_size_is_checked_when_sending() -> None:
    with pytest.raises(ValueError, match="needs 24 bytes"):
        protocol.array("<f4", (2, 3), np.zeros(5, np.float32))


def raw_frame(header: bytes, payload: bytes = b"", magic: bytes = protocol.MAGIC,
              claimed_payload: int | None = None) -> bytes:
    length = len(payload) if claimed_payload is None else claimed_payload
    return struct.pack("!4sIQ", magic, len(header), length) + header + payload


def test_oversized_frame_is_refused_before_reading_its_payload() -> None:
    a, b = pair()
    a.sendall(raw_frame(b'{"type":"ping"}', claimed_payload=protocol.MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.recv(b)
    assert err.value.code == protocol.E_FRAME_TOO_LARGE
    assert "MiB" in str(err.value)


def test_encoding_refuses_oversized_payloads() -> None:
    size = protocol.MAX_PAYLOAD_BYTES + 1
    big = protocol.array("|u1", (size,), bytearray(size))  # zero pages: no real memory touched
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.encode(protocol.TEXTURE, {}, {"x": big})
    assert err.value.code == protocol.E_FRAME_TOO_LARGE


@pytest.mark.parametrize("frame, fragment", [
    (raw_frame(b"{not json"), "malformed frame header"),
    (raw_frame(b'{"type":"launch_missiles"}'), "unknown type"),
    (raw_frame(b'[1,2]'), "malformed frame header"),
    (raw_frame(b'{"type":"ping"}', magic=b"HTTP"), "bad frame magic"),
    (raw_frame(json.dumps({"type": "mesh", "arrays": [{"name": "p", "dtype": "<f4", "shape": [10]}]}).encode(),
               b"\0" * 8), "runs past the end"),
    (raw_frame(json.dumps({"type": "mesh", "arrays": [{"name": "p", "dtype": "object", "shape": [1]}]}).encode(),
               b"\0" * 8), "bad dtype"),
    (raw_frame(b'{"type":"ping"}', b"\0" * 3), "no array describes"),
])
def test_malformed_frames_are_refused(frame: bytes, fragment: str) -> None:
    a, b = pair()
    a.sendall(frame)
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.recv(b)
    assert err.value.code == protocol.E_BAD_FRAME
    assert fragment in str(err.value)


def test_disconnect_mid_frame_is_told_apart_from_a_clean_close() -> None:
    a, b = pair()
    a.sendall(raw_frame(b'{"type":"ping"}', claimed_payload=100) + b"\0" * 10)
    a.close()
    with pytest.raises(protocol.ConnectionClosed) as err:
        protocol.recv(b)
    assert err.value.mid_frame
    c, d = pair()
    c.close()
    with pytest.raises(protocol.ConnectionClosed) as err:
        protocol.recv(d)
    assert not err.value.mid_frame


def test_auth_digest_depends_on_secret_nonce_and_role() -> None:
    s, n = protocol.new_secret(), protocol.new_nonce()
    d = protocol.auth_digest(s, n, "client")
    assert protocol.digest_matches(s, n, "client", d)
    assert not protocol.digest_matches(s, n, "server", d)  # a reflected proof does not pass
    assert not protocol.digest_matches(protocol.new_secret(), n, "client", d)
    assert not protocol.digest_matches(s, protocol.new_nonce(), "client", d)
    assert not protocol.digest_matches(s, n, "client", None)


def test_protocol_module_is_stdlib_only() -> None:
    """Blender imports this file: it must not pull in numpy, torch or anything else."""
    import ast
    import sys
    tree = ast.parse(open(protocol.__file__, encoding="utf-8").read())
    names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names |= {node.module.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names


@pytest.mark.parametrize("prompt, words, file_name", [
    ("a red chair, ornate", ["red", "chair"], "red_chair"),
    ("The Old-Oak table with carved legs", ["Old", "Oak", "table"], "old_oak_table"),
    ("an_odd  name!", ["odd", "name"], "odd_name"),
    ("赤い椅子", ["赤い椅子"], "赤い椅子"),
    (", only a clause", [], "kiln_object"),
    ("CON", ["CON"], "con_object"),  # Windows cannot write con.glb, whatever the extension
    ("x" * 400, ["x" * 400], "x" * 100),  # a file name past 255 bytes failed once the object was made
    ("花瓶" * 100, ["花瓶" * 100], "花瓶" * 16 + "花"),  # 99 bytes: a letter is never cut in half
])
def test_one_naming_rule_for_generated_objects(prompt: str, words: list[str], file_name: str) -> None:
    """Blender's object ("Kiln red chair") and the CLI's files ("red_chair") take the same words."""
    from backend.jobs import object_name

    assert protocol.prompt_words(prompt) == words
    assert object_name(prompt) == file_name
