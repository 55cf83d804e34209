"""The socket client. All socket I/O happens on its two threads; Blender's main thread only puts
requests in ``outgoing`` and drains ``inbox`` from a timer (or inline in background mode)."""

from __future__ import annotations

import queue
import socket
import threading
from dataclasses import dataclass
from typing import Any

from .backend import protocol


@dataclass
class Disconnected:
    """Put in the inbox when the connection ends for any reason."""

    reason: str
    expected: bool


class Client:
    def __init__(self, port: int, secret: str, inbox: "queue.Queue[Any]") -> None:
        self.inbox = inbox
        self.outgoing: queue.Queue[tuple[str, dict[str, Any], dict[str, protocol.Array]] | None] = queue.Queue()
        self.closing = False
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            protocol.client_handshake(self.sock, secret, "blender")
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(None)
        threading.Thread(target=self._read, name="kiln-client-read", daemon=True).start()
        threading.Thread(target=self._write, name="kiln-client-write", daemon=True).start()

    def send(self, msg_type: str, fields: dict[str, Any] | None = None,
             arrays: dict[str, protocol.Array] | None = None) -> None:
        self.outgoing.put((msg_type, fields or {}, arrays or {}))

    def _read(self) -> None:
        try:
            while True:
                self.inbox.put(protocol.recv(self.sock))
        except (protocol.ConnectionClosed, protocol.ProtocolError, OSError) as exc:
            self.inbox.put(Disconnected(str(exc), expected=self.closing))

    def _write(self) -> None:
        while True:
            item = self.outgoing.get()
            if item is None:
                return
            try:
                protocol.send(self.sock, *item)
            except (OSError, protocol.ProtocolError) as exc:
                self.inbox.put(Disconnected(f"sending failed: {exc}", expected=self.closing))
                return

    def close(self) -> None:
        self.closing = True
        self.outgoing.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
