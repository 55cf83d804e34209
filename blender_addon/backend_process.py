"""Finding, starting and stopping the backend process, or finding one started by hand. No bpy
here: plain subprocess and socket work.

The backend runs in its own Python environment (made by the README's set-up command), never in
Blender's: torch in Blender's Python is the leading cause of AI add-on install failures. The
session secret goes to the child on stdin — the command line is readable by other users — and
the open stdin doubles as a lifeline: when Blender dies, the backend sees EOF and exits.
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backend import protocol
from .backend.environment import POINTER_FILE, venv_python
from .client import Client

ADDON_DIR = Path(__file__).resolve().parent
START_TIMEOUT_S = 120.0


#: How to get a backend environment, for every message that finds none.
SET_UP = "press Set Up Backend in Preferences > Add-ons > Kiln (or run `python3 build.py setup` from Kiln's source)"


class BackendError(Exception):
    """The backend cannot be found, started or reached; the message says what to do."""


def find_python(preference: str) -> Path:
    """The backend interpreter: the preference, else $KILN_PYTHON, else what set-up recorded."""
    candidates = [(preference, "the add-on preferences"), (os.environ.get("KILN_PYTHON", ""), "$KILN_PYTHON")]
    if POINTER_FILE.is_file():
        candidates.append((POINTER_FILE.read_text(encoding="utf-8").strip(), str(POINTER_FILE)))
    for value, source in candidates:
        if not value.strip():
            continue
        path = Path(value.strip()).expanduser()  # pasted paths bring spaces and newlines along
        if path.is_file():
            return path
        if path.is_dir():  # the environment's folder, or its bin folder, picked in the file browser
            inside = next((p for p in (venv_python(path), venv_python(path.parent), path / Path(sys.executable).name)
                           if p.is_file()), None)
            if inside is not None:
                return inside
            raise BackendError(f"the backend Python set in {source} is a folder with no Python in it: {path}; "
                               f"choose the environment's interpreter ({venv_python(Path('ENV'))}), or {SET_UP}")
        raise BackendError(f"the backend Python set in {source} does not exist: {path}; {SET_UP}, "
                           "or fix Backend Python in the same preferences")
    raise BackendError(f"no backend is set up yet: {SET_UP}, or set Backend Python in the same preferences")


@dataclass(frozen=True)
class BackendChoice:
    """Where jobs go, from the preferences: a backend Blender starts with the interpreter
    ``python_preference`` names (see ``find_python``), or, when ``connection_file`` is not None, one
    started by hand that wrote that file ("": the default file)."""

    python_preference: str = ""
    connection_file: str | None = None


class BackendProcess:
    def __init__(self, python: Path, offline: bool) -> None:
        self.python = python
        self.offline = offline
        self.secret = protocol.new_secret()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        #: What the backend computes on ("cpu", or the GPU's name), from its ready line; the panel shows
        #: it, since a backend without a GPU runs real models far too slowly to wait for.
        self.device = ""
        #: Its Python, torch and diffusers versions, from its ready line, for Copy Diagnostics.
        self.software = ""
        #: Why it runs on the CPU of a machine with an NVIDIA card, with the fix ("" when it does not).
        self.gpu_problem = ""
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)

    def start(self) -> int:
        """Spawn and wait for the port; blocking, so call it off Blender's main thread."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ADDON_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        if self.offline:
            env["HF_HUB_OFFLINE"] = "1"
        flags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
        try:
            self.proc = subprocess.Popen([str(self.python), "-m", "backend", "serve"], cwd=str(ADDON_DIR),
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env=env, creationflags=flags)
        except OSError as exc:
            raise BackendError(f"could not run the backend Python {self.python}: {exc}") from None
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self.proc.stdin.write(self.secret.encode("ascii") + b"\n")
        self.proc.stdin.flush()
        threading.Thread(target=self._read_stderr, name="kiln-backend-stderr", daemon=True).start()
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._read_ready_line, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            try:
                ready = json.loads(line)
                self.port = int(ready["port"])
                self.device = str(ready.get("device") or "")
                self.software = str(ready.get("software") or "")
                self.gpu_problem = str(ready.get("gpu_problem") or "")
                return self.port
            except (ValueError, KeyError, TypeError):
                break
        self.stop()
        raise BackendError(f"the backend failed to start{self._exit_note()}. {self.diagnosis()}")

    def _read_ready_line(self, lines: "queue.Queue[bytes]") -> None:
        """The backend's one stdout line; it sends the rest of its output to stderr."""
        assert self.proc and self.proc.stdout
        with self.proc.stdout:
            lines.put(self.proc.stdout.readline())

    def _read_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        with self.proc.stderr:  # closed once the backend (and any child holding it) is gone
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip()
                self.stderr_tail.append(line)
                print(line, file=sys.stderr)

    def _exit_note(self) -> str:
        code = self.proc.poll() if self.proc else None
        return "" if code is None else f" (exit code {code})"

    def diagnosis(self) -> str:
        """The most useful stderr lines, with a fix for the common failures."""
        time.sleep(0.1)  # let the stderr reader catch the last lines of a dying process
        tail = "\n".join(list(self.stderr_tail)[-8:])
        if "No module named" in tail:
            return (f"The backend Python {self.python} lacks Kiln's dependencies: {SET_UP}, or point Backend "
                    f"Python at its environment. Last output:\n{tail}")
        return f"Last output:\n{tail}" if tail else "It printed nothing."

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self, inbox: "queue.Queue[Any]") -> Client:
        return Client(self.port, self.secret, inbox)

    def describe(self) -> str:
        if self.device == "cpu":
            return f"running on the CPU (slow with real models), port {self.port}"
        where = f"on {self.device}, port" if self.device else "on port"
        return f"running {where} {self.port}"

    def exited(self, grace: float) -> bool:
        """Whether the process has ended, giving it ``grace`` seconds: a dying backend's socket
        closes a moment before its exit status can be read."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return False
        return True

    def exit_description(self) -> str:
        return f"the backend process exited{self._exit_note()}. {self.diagnosis()}"

    def stop(self, timeout: float = 5.0) -> None:
        """Close the lifeline (the backend exits by itself), then make sure."""
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=timeout)


class StandingBackend:
    """A backend started by hand (``python -m backend serve --connection-file``), reached through
    the port and secret in its connection file. Blender neither starts nor stops it: it keeps its
    loaded models across Blender sessions, and its output is in the terminal that runs it."""

    stderr_tail: tuple[str, ...] = ()
    gpu_problem = ""  # its own terminal says, at its start

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.info = protocol.read_connection_file(path)
        except ValueError as exc:
            raise BackendError(f"{exc}, or set Backend to 'Start Its Own' in Preferences > Add-ons > Kiln") from None
        self.port, self.secret = int(self.info["port"]), str(self.info["secret"])
        self.device = str(self.info.get("device") or "")
        #: Its Python, torch and diffusers versions, for Copy Diagnostics.
        self.software = str(self.info.get("software") or "")

    def connect(self, inbox: "queue.Queue[Any]") -> Client:
        try:
            return Client(self.port, self.secret, inbox)
        except OSError as exc:
            raise BackendError(f"nothing answers on port {self.port}, which {self.path} names ({exc}): that backend "
                               "has stopped. Start it again with `python -m backend serve --connection-file`, or "
                               "set Backend to 'Start Its Own' in Preferences > Add-ons > Kiln") from None

    def alive(self) -> bool:
        """Whether its file still names it: the backend removes the file when it stops."""
        try:
            return protocol.read_connection_file(self.path) == self.info
        except ValueError:
            return False

    def exited(self, grace: float) -> bool:
        return not self.alive()

    def exit_description(self) -> str:
        return (f"the backend started outside Blender stopped ({self.path} no longer names it); its terminal says "
                "why")

    def describe(self) -> str:
        where = f" on {self.device}" if self.device else ""
        return f"connected{where}, port {self.port} (started outside Blender; Stop leaves it running)"

    def stop(self, timeout: float = 5.0) -> None:
        """Not ours to stop: whoever started it stops it (Ctrl+C in its terminal)."""


class EnvironmentSetup:
    """The Set Up Backend button's work: ``python -m backend.environment FOLDER`` run by Blender's
    own Python from the installed extension (the zip carries that module and the requirements), on
    a thread so Blender stays responsive through a download of several GB. ``status`` is its latest
    step and what pip is fetching or installing in it; once ``done`` is set, ``python`` is the new
    environment's interpreter, or ``error`` says why there is none."""

    def __init__(self, folder: Path, base_python: str = sys.executable) -> None:
        self.folder = folder
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.status = self.step = "starting"
        self.python: Path | None = None
        self.error = ""
        self.done = threading.Event()
        env = dict(os.environ, PYTHONPATH=str(ADDON_DIR), PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen([base_python, "-m", "backend.environment", str(folder), "--progress"],
                                         cwd=str(ADDON_DIR),
                                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, errors="replace",
                                         creationflags=subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0)
        except OSError as exc:
            raise BackendError(f"could not run {base_python} to set up the backend: {exc}") from None
        threading.Thread(target=self._follow, name="kiln-setup", daemon=True).start()

    def _follow(self) -> None:
        assert self.proc.stdout
        with self.proc.stdout:
            for raw in self.proc.stdout:
                line = raw.rstrip()
                self.lines.append(line)
                print(line, file=sys.stderr)
                if line.startswith("kiln-setup: step"):
                    self.step = self.status = line.removeprefix("kiln-setup: ")
                elif line.startswith(("Collecting ", "Downloading ", "Installing collected packages")):
                    self.status = f"{self.step} · {line[:80]}"  # what a long step is fetching now
        code = self.proc.wait()
        if code == 0:
            self.python, self.status = venv_python(self.folder), "done"
        else:
            tail = "\n".join(list(self.lines)[-6:])
            self.error = f"setting up the backend failed (exit code {code}) at {self.step}. Last output:\n{tail}"
            self.status = "failed"
        self.done.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
