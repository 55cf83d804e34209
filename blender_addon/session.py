"""One run of "Texture Selected" (a job per object) or "Generate Object" (one job): submits the
jobs and applies what comes back.

``pump`` runs on the main thread — from the modal operator's timer in the UI, or in a blocking
loop in background mode, where timers never fire. The slow parts (starting the backend,
connecting, sending meshes) run on a thread and report through the same inbox as the socket.
"""

from __future__ import annotations

import atexit
import contextlib
import platform
import queue
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bpy
import numpy as np

from . import blend_assets
from .backend import __version__, protocol
from .backend_process import BackendChoice, BackendError, BackendProcess, StandingBackend, find_python
from .bake import REFERENCE, REFERENCE_SIZE, bake_base_colour
from .client import Client, Disconnected
from .materials import existing_texture, image_problem, slot_sources, unreadable_colour
from .properties import typed_path
from .scene_io import (
    LiveTexture,
    PointPreview,
    ReferenceIcon,
    SceneError,
    add_tile_uv_map,
    add_uv_map,
    build_object,
    check_paintable,
    mesh_arrays,
    outdated_unwrap,
    reference_arrays,
    save_texture,
    saved_texture,
    share_texture,
    start_live_texture,
)
from .texture_file import TextureFile


class BackendManager:
    """The one backend of this Blender session: a process it starts (restarted when it has died),
    or one started by hand that it connects to."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: BackendProcess | StandingBackend | None = None

    def ensure(self, choice: BackendChoice, offline: bool) -> BackendProcess | StandingBackend:
        if choice.connection_file is not None:
            path = Path(choice.connection_file).expanduser() if choice.connection_file else \
                protocol.default_connection_file()
            standing = StandingBackend(path)  # read afresh: a restarted backend has a new port and secret
            self._replace(standing)
            return standing
        python = find_python(choice.python_preference)  # raises if the configured interpreter is gone
        with self.lock:
            current = self.process
            if not isinstance(current, BackendProcess) or not current.alive() \
                    or (current.python, current.offline) != (python, offline):
                if current is not None:
                    current.stop()
                process = BackendProcess(python, offline)
                process.start()
                self.process = process
            return self.process

    def _replace(self, backend: StandingBackend) -> None:
        with self.lock:
            if self.process is not None:
                self.process.stop()  # a process of ours, when switching to a standing backend
            self.process = backend

    def stop(self) -> None:
        with self.lock:
            if self.process is not None:
                self.process.stop()
                self.process = None

    def unload_models(self, timeout: float = 30.0) -> str:
        """Ask the running backend to drop its cached models (frees VRAM); blocking, use a thread."""
        process = self.process
        if process is None or not process.alive():
            return "the backend is not running: no models are loaded"
        inbox: queue.Queue[Any] = queue.Queue()
        try:
            client = process.connect(inbox)
        except BackendError as exc:
            return str(exc)
        try:
            client.send(protocol.UNLOAD)
            while True:
                reply = inbox.get(timeout=timeout)
                if isinstance(reply, protocol.Message) and reply.type == protocol.LOG:
                    return str(reply.get("text"))
                if isinstance(reply, Disconnected):
                    return f"the backend went away: {reply.reason}"
        except queue.Empty:
            return f"the backend did not answer within {timeout:.0f} s; Stop Backend frees its memory for sure"
        finally:
            client.close()

    def diagnostics(self) -> str:
        """What a bug report needs: Kiln's, Blender's and the backend's versions, the backend's
        status and its recent output."""
        process = self.process
        lines = list(process.stderr_tail) if process else []
        none = "(started outside Blender: its output is in its own terminal)" \
            if isinstance(process, StandingBackend) else "(no backend output)"
        where = getattr(process, "python", None) or getattr(process, "path", None)
        backend = "; ".join(str(x) for x in (where, getattr(process, "software", "")) if x)
        return "\n".join([f"Kiln {__version__} in Blender {bpy.app.version_string}, {platform.platform()}",
                          f"Kiln backend: {self.status()}" + (f" ({backend})" if backend else ""),
                          *(lines or [none])])

    def gpu_problem(self) -> str:
        """Why the running backend cannot use the machine's NVIDIA card, with the fix ("" if none)."""
        process = self.process
        return process.gpu_problem if process is not None and process.alive() else ""

    def status(self) -> str:
        process = self.process
        if process is None:
            return "stopped"
        if not process.alive():
            return "exited"
        return process.describe()


MANAGER = BackendManager()
atexit.register(MANAGER.stop)


@dataclass
class _Connected:
    client: Client


@dataclass
class _StartFailed:
    message: str


@dataclass
class _Written:
    """A target's texture file is made: its image is pointed at it (``saved_texture``)."""
    target: Target


@dataclass
class Target:
    name: str
    fields: dict[str, Any]
    arrays: dict[str, protocol.Array]
    job: int | None = None
    done: int = 0
    total: int = 1
    phase: str = "queued"
    eta: float | None = None
    live: LiveTexture | None = None
    preview: PointPreview | None = None   # generation only, until the object arrives
    created: bool = False                 # generation: the object exists in the scene
    status: str = "pending"  # pending → running → finished | cancelled | failed
    error: str = ""
    saved_to: str = ""
    saving: TextureFile | None = None     # the finished texture's PNG, being made off the main thread
    reference: str = ""                   # the library asset the job warms up toward
    reference_icon: int = 0
    obj: Any = None                       # the object painted: found again after a rename, unlike a name
    shares: list[Any] = field(default_factory=list)  # selected linked duplicates of ``obj``, shown its texture too
    progress_log: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the artist should know of how it was sent

    @property
    def ended(self) -> bool:
        return self.status in ("finished", "cancelled", "failed")


def read_settings(settings: Any) -> dict[str, Any]:
    """The job fields from the scene's Kiln settings, checked before anything starts."""
    prompt = settings.prompt.strip()
    if not prompt:
        raise SceneError("the prompt is empty: type what the texture (or new object) should show in the Kiln panel")
    if not protocol.MIN_TEXTURE_SIZE <= settings.texture_size <= protocol.MAX_TEXTURE_SIZE:
        raise SceneError(f"texture size {settings.texture_size} is out of range: choose "
                         f"{protocol.MIN_TEXTURE_SIZE} to {protocol.MAX_TEXTURE_SIZE} pixels")
    model = typed_path(settings.model)
    if not model:
        raise SceneError("no model chosen: enter a Hugging Face id, a folder, a .safetensors file, or 'tiny'")
    fields = {"prompt": prompt, "negative_prompt": settings.negative_prompt, "model": model,
              "method": settings.method, "seed": int(settings.seed), "texture_size": int(settings.texture_size),
              "steps": int(settings.steps) or None, "guidance": float(settings.guidance) or None}
    for name in ("controlnet", "lora", "vae"):
        if path := typed_path(getattr(settings, name)):
            fields[name] = path
    for name in ("lora", "controlnet"):  # a weight goes with its model part only
        if name in fields:
            fields[f"{name}_weight"] = float(getattr(settings, f"{name}_weight"))
    if settings.refine:  # the backend refines when the job carries a texture; strength says how far
        fields["strength"] = float(settings.strength)
    return fields


def reference_fields(settings: Any, library: dict[str, Any]) -> tuple[dict[str, Any], dict[str, protocol.Array]]:
    """The fields (and, for the artist's own object, arrays) that give a job its references when
    Use References is on: the reference object, else the ticked search hits, else the libraries
    to retrieve from by prompt; with ReDream's options."""
    if not settings.use_references:
        return {}, {}
    options = {"adapt_prior": bool(settings.adapt_prior),
               # delta denoising is an SDS/SSD option; the panel hides it for SIR, so it is not sent then
               "delta_denoising": bool(settings.delta_denoising) and settings.method != "sir"}
    if settings.reference_source == "OBJECT":
        obj = settings.reference_object
        if obj is None:
            raise SceneError("Use References takes an object, but none is picked: pick the reference object in "
                             "the Kiln panel, or switch the source to Libraries")
        missing = image_problem(obj) if obj.type == "MESH" else None
        if missing is not None:  # else it would be sent in flat colours without a word
            raise SceneError(f"the reference object {obj.name!r} cannot show its colours: {missing}; or pick another "
                             "reference object")
        readable = obj.type != "MESH" or unreadable_colour(obj) is None
        baked = None if readable else bake_base_colour(obj, REFERENCE_SIZE, REFERENCE)
        fields, arrays = reference_arrays(obj, baked)
        return {**options, **fields}, arrays
    if len(settings.hits):
        picked = [hit.file for hit in settings.hits if hit.use]
        if not picked:
            raise SceneError("every found reference is unticked: tick the ones to use, press Clear to let Kiln "
                             "pick by prompt, or untick Use References")
        return {**options, "references": picked, **{k: v for k, v in library.items() if k == "clip"}}, {}
    if not library["libraries"]:
        raise SceneError("Use References is on but no asset library is set: add your asset folders in "
                         "Preferences > Add-ons > Kiln and press Index Libraries, or untick Use References")
    return {**options, **library}, {}


def target_for(obj: Any, refine: bool, selected_faces: bool = False, size: int = 1024) -> Target:
    """What to send for one object; in refine mode what it shows now: its Base Color images read
    through their UVs (each face from its own material), or, where colours come from nodes Kiln
    cannot read (a procedural texture, a ramp, flat colours), those colours baked by Cycles at
    ``size``² onto the render UV map. With ``selected_faces``, which of its triangles may change (a
    blank start changes them all, as the panel shows by greying the option out)."""
    check_paintable(obj)
    if not refine:
        outdated = outdated_unwrap(obj)
        return Target(obj.name, *mesh_arrays(obj, unwrap=outdated), obj=obj,
                      notes=[f"{obj.name}: its faces changed since Kiln made its UV map {protocol.UNWRAP_UV_MAP!r}, "
                             "so Kiln made it again"] if outdated else [])
    found, problem, unreadable = existing_texture(obj), image_problem(obj), unreadable_colour(obj)
    if problem is not None:
        raise SceneError(f"{obj.name!r} has nothing to refine: {problem}; or untick Refine Existing Texture")
    if found is not None and unreadable is None:
        fields, arrays = mesh_arrays(obj, found.uv_map, slot_sources(obj), selected_faces=selected_faces)
        rgba = found.rgba8()
        note = ""
    else:
        rgba, uv_map = bake_base_colour(obj, size)
        fields, arrays = mesh_arrays(obj, uv_map, selected_faces=selected_faces)
        why = f"its colours come through {unreadable}" if unreadable else "its materials show flat colours"
        note = (f"{obj.name}: {why}, so Kiln baked what they show ({size}² on the UV map {uv_map!r}, lighting "
                "left out) and refined from that")
    arrays["init_texture"] = protocol.array("|u1", rgba.shape, rgba)
    return Target(obj.name, fields, arrays, obj=obj, notes=[note] if note else [])


class TextureSession:
    def __init__(self, objects: list[Any], job_fields: dict[str, Any], backend: BackendChoice,
                 refine: bool = False, selected_faces: bool = False,
                 shared_arrays: dict[str, protocol.Array] | None = None) -> None:
        if not objects:
            raise SceneError("no mesh selected: select one or more mesh objects to texture")
        first: dict[int, Any] = {}  # linked duplicates share one mesh, its UV maps and its materials
        for obj in objects:
            first.setdefault(obj.data.as_pointer() if obj.type == "MESH" else id(obj), obj)
        self._setup([target_for(obj, refine, selected_faces, int(job_fields["texture_size"]))
                     for obj in first.values()], job_fields, backend, shared_arrays)
        self.notes += [note for target in self.targets for note in target.notes]
        by_mesh = dict(zip(first, self.targets, strict=True))
        for obj in objects:
            if obj not in first.values():
                by_mesh[obj.data.as_pointer()].shares.append(obj)
        self.notes += [f"{obj.name} shares its mesh with {first[obj.data.as_pointer()].name}, so it was "
                       "textured once and both show it" for obj in objects if obj not in first.values()]

    def _setup(self, targets: list[Target], job_fields: dict[str, Any], backend: BackendChoice,
               shared_arrays: dict[str, protocol.Array] | None = None) -> None:
        """``shared_arrays`` go with every target's job (the reference object's mesh and texture)."""
        self.job_fields = dict(job_fields)
        self.shared_arrays = shared_arrays or {}
        self.job_fields["offline"] = not getattr(bpy.app, "online_access", True)
        self.backend = backend
        self.targets = targets
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.client: Client | None = None
        self.cancel_requested = False
        self.failure = ""
        self.notes: list[str] = []
        self._lock = threading.Lock()       # between the starting thread and ``abandon``
        self._abandoned = False
        self._started: Client | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._connect_and_submit, name="kiln-start", daemon=True).start()

    def _connect_and_submit(self) -> None:
        try:
            process = MANAGER.ensure(self.backend, self.job_fields["offline"])
            client = process.connect(self.inbox)
        except (BackendError, OSError, protocol.ProtocolError) as exc:
            self.inbox.put(_StartFailed(str(exc)))
            return
        except Exception as exc:  # a bug here must end the job, not leave it "starting" for ever
            traceback.print_exc()
            self.inbox.put(_StartFailed(f"a bug in Kiln stopped the job from starting ({type(exc).__name__}: {exc}); "
                                        "please report it with the console output"))
            return
        with self._lock:
            if self._abandoned:
                client.close()
                return
            self._started = client
        self.inbox.put(_Connected(client))
        for target in self.targets:
            client.send(protocol.SUBMIT, {**self.job_fields, **target.fields, "tag": target.name},
                        {**target.arrays, **self.shared_arrays})

    def cancel(self) -> None:
        self.cancel_requested = True
        if self.client is None:
            return
        for target in self.targets:
            if target.job is not None and not target.ended:
                self.client.send(protocol.CANCEL, {"job": target.job})

    def abandon(self, why: str) -> None:
        """End at once without touching the scene, which no longer holds what the jobs wrote (another
        file was opened, or an undo took it back): closing the connection makes the backend cancel
        its jobs."""
        with self._lock:
            self._abandoned = True
            client, self._started = self._started, None
        if client is not None:
            client.close()
        self.client = None
        self.cancel_requested = True
        for target in self.targets:
            if not target.ended:
                target.status, target.error = "cancelled", why
            target.live, target.preview, target.created, target.saving = None, None, False, None

    @property
    def finished(self) -> bool:
        """Every job ended and its texture written (or packed): until then the result would not
        survive saving the .blend, so the operator, and its undo step, wait."""
        return (bool(self.failure) or all(t.ended for t in self.targets)) and not any(t.saving for t in self.targets)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # --- progress --------------------------------------------------------------------------
    def progress(self) -> tuple[float, str]:
        done = sum(t.done for t in self.targets)
        total = sum(max(t.total, 1) for t in self.targets)
        active = next((t for t in self.targets if t.status == "running"), None)
        saving = next((t for t in self.targets if t.saving is not None), None)
        if active is None and saving is not None:
            return done / total, f"{saving.name}: writing the texture"
        if active is None:
            return done / total, "Starting backend…" if self.client is None else "Queued…"
        eta = f" · ETA {active.eta:.0f} s" if active.eta is not None else ""
        steps = f" {active.done}/{active.total}" if active.progress_log else ""  # none yet: waiting its turn
        return done / total, f"{active.name}: {active.phase}{steps}{eta}"

    def summary(self) -> str:
        parts = [f"{t.name}: {t.status}" + (f" ({t.error})" if t.error else "")
                 + (f", reference {t.reference}" if t.reference else "")
                 + (f", texture {t.saved_to}" if t.saved_to else "") for t in self.targets]
        text = "; ".join(parts)
        return f"{self.failure} — {text}" if self.failure else text

    @property
    def changed_scene(self) -> bool:
        """Whether the scene holds anything of this session's (a texture, a new object): then an
        undo step is owed even when the job did not finish."""
        return any(t.live is not None or t.created for t in self.targets)

    @property
    def succeeded(self) -> bool:
        return not self.failure and all(t.status == "finished" for t in self.targets)

    def before_save(self) -> None:
        """The .blend is being saved mid-job (an artist's habitual Ctrl+S), and may be all that is
        left of it if Blender goes. Each texture is packed as it stands: until the job ends it has
        no file, and Blender saves an image without one as blank (black objects came back); the
        finished texture's file replaces the pack (``saved_texture``). Point previews leave the
        scene for the save (``after_save`` brings them back): a file kept one, a cloud of
        tetrahedra its job would never remove."""
        for target in self.targets:
            if target.live is not None and not target.saved_to:  # its PNG being written too: not yet its file
                with contextlib.suppress(ReferenceError):  # the image was undone or deleted meanwhile
                    target.live.image.pack()
            if target.preview is not None:
                with contextlib.suppress(ReferenceError):  # the artist deleted it: the job stops at its next frame
                    target.preview.remove()

    def after_save(self) -> None:
        for target in self.targets:
            if target.preview is not None:
                target.preview.restore()

    # --- applying messages -----------------------------------------------------------------
    def pump(self, timeout: float = 0.0) -> None:
        """Apply everything waiting; of several preview frames (textures, points) for one job only
        the newest is applied (the backend already drops frames for slow clients; this catches the rest)."""
        if self._abandoned:  # whatever is still queued belongs to a file that is gone
            return
        batch: list[Any] = [_Written(t) for t in self.targets if t.saving is not None and t.saving.done]
        try:
            batch.append(self.inbox.get(timeout=timeout) if timeout > 0 else self.inbox.get_nowait())
            while True:
                batch.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        def preview_key(item: Any) -> tuple[Any, str] | None:
            if isinstance(item, protocol.Message) and (
                    item.type == protocol.POINTS or (item.type == protocol.TEXTURE and not item.get("final"))):
                return item.get("job"), item.type
            return None

        newest = {preview_key(item): i for i, item in enumerate(batch)}
        for i, item in enumerate(batch):
            key = preview_key(item)
            if key is not None and newest[key] != i:
                continue
            try:
                self._apply(item)
            except ReferenceError:
                # Ctrl+Z mid-job brings back the scene from before the job (or the artist deleted
                # its image): what it painted into is gone, so it stops and leaves the scene as is.
                self.abandon("undone while it ran")
                self.failure = "stopped: the job's texture or object was undone or deleted while it ran"
                return
            except (SceneError, RuntimeError, ValueError, KeyError) as exc:
                # The scene changed under the job (mesh edited, object renamed): stop cleanly
                # rather than leave a modal operator half-alive.
                self.failure = f"could not apply the backend's result: {exc}"
                self.cancel()
                self._end_unfinished("failed", "scene changed during the job")
                self.close()
                return
            except Exception as exc:  # a bug must not leave the panel on a job that nothing drives
                traceback.print_exc()
                self.abandon("stopped by a bug in Kiln")
                self.failure = (f"a bug in Kiln stopped the job ({type(exc).__name__}: {exc}); please report it "
                                "with the console output")
                return

    def _target(self, msg: protocol.Message) -> Target | None:
        job, tag = msg.get("job"), msg.get("tag")
        for t in self.targets:
            if (job is not None and t.job == job) or (tag is not None and t.name == tag and t.job is None):
                return t
        return None

    def _apply(self, item: Any) -> None:
        if isinstance(item, _Written):
            target = item.target
            made, target.saving = target.saving, None
            target.saved_to = saved_texture(target.live, made)
            if self.finished:
                self.close()
            return
        if isinstance(item, _Connected):
            self.client = item.client
            if self.cancel_requested:
                self.close()
                for t in self.targets:
                    t.status = "cancelled"
            return
        if isinstance(item, _StartFailed):
            self.failure = item.message
            return
        if isinstance(item, Disconnected):
            if not item.expected and not self.finished:
                process = MANAGER.process
                why = process.exit_description() if process and process.exited(grace=0.5) else item.reason
                self.failure = f"lost the backend mid-job: {why}"
                self._end_unfinished("failed", "backend lost")
            return
        msg: protocol.Message = item
        target = self._target(msg)
        if msg.type == protocol.LOG:
            self.notes.append(str(msg.get("text")))
            print(f"Kiln: {msg.get('text')}")
            return
        if target is None:
            if msg.type == protocol.ERROR:
                self.failure = f"backend error: {msg.get('message')}"
            return
        if msg.type == protocol.ACCEPTED:
            target.job, target.status = msg.get("job"), "running"
            if ahead := int(msg.get("queue_position") or 0):  # a backend shared with batch runs or other Blenders
                target.phase = f"waiting for {ahead} job{'s' if ahead > 1 else ''} ahead of it"
            if self.cancel_requested and self.client:
                self.client.send(protocol.CANCEL, {"job": target.job})
        elif msg.type == protocol.PROGRESS:
            target.done, target.total = int(msg.get("done")), int(msg.get("total"))
            target.phase, target.eta = str(msg.get("phase")), msg.get("eta_s")
            target.progress_log.append(target.done)
        elif msg.type == protocol.MESH:
            obj = painted(target)
            if obj is not None and msg.get("tiles") is not None:
                target.fields["uv_map"] = add_tile_uv_map(obj, target.fields["uv_map"], msg.get("tiles"))
            elif obj is not None:
                uv = msg.arrays["loop_uvs"]
                target.fields["uv_map"] = add_uv_map(obj, np.frombuffer(uv.data, np.float32).reshape(uv.shape))
        elif msg.type == protocol.TEXTURE:
            self._apply_texture(target, msg)
        elif msg.type in (protocol.POINTS, protocol.OBJECT):
            self._apply_generated(target, msg)
        elif msg.type == protocol.REFERENCE:
            target.reference = (f"{Path(str(msg.get('file'))).name} (score {float(msg.get('score')):.2f}, "
                                f"turned {float(msg.get('yaw')):.0f}°)")
            thumbs = msg.arrays["thumbnails"]
            target.reference_icon = ReferenceIcon.show(str(msg.get("file")),
                                                       np.frombuffer(thumbs.data, np.uint8).reshape(thumbs.shape)[0])
        elif msg.type == protocol.HITS:
            self._apply_hits(msg)
        elif msg.type == protocol.ERROR:
            target.status, target.error = "failed", str(msg.get("message"))
            if msg.get("code") == protocol.E_WEIGHTS_OFFLINE and self.job_fields["offline"]:
                target.error += (" Blender's online access is off, so Kiln does not download: turn on "
                                 "Preferences > System > Network > Allow Online Access to fetch the model.")
            self._finish(target)
        elif msg.type == protocol.DONE:
            target.status = str(msg.get("status"))
            if target.status == "finished":
                target.done = target.total
            self._finish(target)
        if self.finished:
            self.close()

    def _apply_texture(self, target: Target, msg: protocol.Message) -> None:
        obj = painted(target)
        if obj is None:  # deleted while the job ran: nothing to paint, so nothing more to compute
            if self.client is not None and target.job is not None and not target.error:
                target.error = "its object was deleted"
                self.client.send(protocol.CANCEL, {"job": target.job})
            return
        rgba = msg.arrays["rgba"]
        if target.live is None:
            target.live = start_live_texture(obj, target.fields["uv_map"], (rgba.shape[1], rgba.shape[0]),
                                             record=not target.created)  # a generated object had none before
            for other in target.shares:
                share_texture(other, obj)
        target.live.update(rgba)

    def _apply_generated(self, target: Target, msg: protocol.Message) -> None:
        raise SceneError(f"the backend sent {msg.type!r} for a texturing job")

    def _apply_hits(self, msg: protocol.Message) -> None:
        raise SceneError(f"the backend sent {msg.type!r} for a job that did not search")

    def _finish(self, target: Target) -> None:
        """Keep the last good texture of any job that produced one, finished or not."""
        drop_preview(target)  # a generation that never reached its object leaves no trace
        if target.live is not None:
            target.saving = save_texture(target.live, int(self.job_fields["seed"]))

    def _end_unfinished(self, status: str, error: str) -> None:
        for target in self.targets:
            if not target.ended:
                target.status, target.error = status, error
                self._finish(target)


def painted(target: Target) -> Any:
    """The object a job paints, under whatever name it has now; None once it is deleted."""
    if target.obj is None:
        return None
    try:
        target.obj.name  # a deleted (or undone) object's reference raises on any access
    except ReferenceError:
        return None
    return target.obj


def drop_preview(target: Target) -> None:
    if target.preview is not None:
        target.preview.remove()
        target.preview = None


def object_name(prompt: str) -> str:
    """A readable object name from the prompt ("a red chair, ornate" → "Kiln red chair"), made
    unique the way Blender would."""
    base = "Kiln " + (" ".join(protocol.prompt_words(prompt)) or "object")
    name, counter = base, 1
    while name in bpy.data.objects:
        name = f"{base}.{counter:03d}"
        counter += 1
    return name


class IndexSession(TextureSession):
    """Indexing the artist's asset libraries: first, here, exporting the assets of .blend files that
    changed (one .blend per pump, so the UI stays live), then the backend's index job over the
    folders and the exports; progress in the panel, the outcome in the report. The scene is not
    touched (what exporting appends is removed at once)."""

    def __init__(self, library: dict[str, Any], blend_folders: list[str], backend: BackendChoice) -> None:
        self.blends = blend_assets.blend_files(blend_folders)
        libraries = [f for f in library["libraries"] if Path(f) != blend_assets.cache_root()]
        if not libraries and not self.blends:
            raise SceneError("no asset library to index: add your asset folders in Preferences > Add-ons > Kiln")
        exports = [str(blend_assets.cache_root())] if self.blends else []
        self._setup([Target("Asset libraries", {"task": protocol.TASK_INDEX}, {})],
                    {**library, "libraries": libraries + exports}, backend)
        self.pending = [b for b in self.blends if not blend_assets.is_current(b)]

    def start(self) -> None:
        if not self.pending:
            self._exports_done()

    def pump(self, timeout: float = 0.0) -> None:
        if not self.pending:
            super().pump(timeout)
            return
        target = self.targets[0]
        if self.cancel_requested:  # before the backend is asked: nothing to tell it
            self.pending.clear()
            target.status = "cancelled"
            return
        blend = self.pending.pop(0)
        target.status, target.phase = "running", f"exporting the assets of {blend.name}"
        try:
            count, notes = blend_assets.export_blend(blend)
            self.notes += [f"{blend.name}: {count} assets exported", *notes]
        except (OSError, RuntimeError, ValueError) as exc:
            self.notes.append(f"skipped {blend.name}: {exc}")
        target.done, target.total = len(self.blends) - len(self.pending), len(self.blends)
        if not self.pending:
            self._exports_done()

    def _exports_done(self) -> None:
        blend_assets.drop_stale(self.blends)
        super().start()


class SearchSession(TextureSession):
    """A search of the artist's libraries for the prompt: its hits replace the scene's list of
    found references (all ticked), with thumbnails as icons. The scene is otherwise untouched."""

    def __init__(self, settings: Any, library: dict[str, Any], backend: BackendChoice) -> None:
        if not settings.prompt.strip():
            raise SceneError("the prompt is empty: type what to find references for in the Kiln panel")
        if not library["libraries"]:
            raise SceneError("no asset library to search: add your asset folders in Preferences > Add-ons > Kiln "
                             "and press Index Libraries")
        self._setup([Target("Search", {"task": protocol.TASK_SEARCH}, {})],
                    {"prompt": settings.prompt.strip(), **library}, backend)
        self.settings = settings

    def _apply_hits(self, msg: protocol.Message) -> None:
        thumbs = msg.arrays["thumbnails"]
        thumbnails = np.frombuffer(thumbs.data, np.uint8).reshape(thumbs.shape)
        self.settings.hits.clear()
        for hit, views in zip(msg.get("hits"), thumbnails, strict=True):
            item = self.settings.hits.add()
            item.file, item.caption, item.score, item.use = hit["file"], hit["caption"], float(hit["score"]), True
            ReferenceIcon.show(item.file, views[0])
        self.notes.append(f"found {len(self.settings.hits)} references: untick the ones not to use")


class GenerateSession(TextureSession):
    """One generation job: a point preview at ``location`` while the Gaussians optimise, then the
    object with its UV map, then its textures through the texturing path's live material."""

    def __init__(self, job_fields: dict[str, Any], backend: BackendChoice, location: Any,
                 shared_arrays: dict[str, protocol.Array] | None = None) -> None:
        texturing_only = ("controlnet", "controlnet_weight", "strength")
        fields = {k: v for k, v in job_fields.items() if k not in texturing_only}
        target = Target(object_name(job_fields["prompt"]),
                        {"task": protocol.TASK_GENERATE, "uv_map": protocol.UNWRAP_UV_MAP}, {})
        self._setup([target], fields, backend, shared_arrays)
        self.location = tuple(location)

    def _apply_generated(self, target: Target, msg: protocol.Message) -> None:
        def arr(name: str) -> np.ndarray:
            blob = msg.arrays[name]
            return np.frombuffer(blob.data, np.dtype(blob.dtype)).reshape(blob.shape)

        if msg.type == protocol.POINTS:
            if target.preview is None:
                target.preview = PointPreview(target.name, self.location)
            target.preview.update(arr("positions"), arr("colors"), arr("sizes"))
            return
        # Where the artist left the preview (a deleted one stops the job here, before the object is made).
        placement = target.preview.transform() if target.preview is not None else None
        obj = build_object(target.name, arr("positions"), arr("triangles"), arr("corner_uvs"), self.location)
        if placement is not None:
            obj.matrix_basis = placement
        target.name, target.obj, target.created = obj.name, obj, True
        drop_preview(target)
