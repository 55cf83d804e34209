"""Operators. "Texture Selected" and "Generate Object" are modal in the UI (timer-driven, Esc
cancels) and blocking in background mode, where no timer ever fires; both paths drive the same
session object."""

from __future__ import annotations

import atexit
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import bpy

from . import scene_io
from . import session as sessions
from .backend import protocol
from .backend_process import BackendError, EnvironmentSetup, StandingBackend
from .properties import backend_choice, blend_folders, library_fields, preferences
from .scene_io import SceneError

#: The running texture session, if any; one at a time keeps the undo history simple.
ACTIVE: sessions.TextureSession | None = None


#: Why the last press of a job button started nothing: shown in the panel, with its fix-it
#: button, until a job starts or the fix is made.
REFUSAL: SceneError | None = None


def _running() -> bool:
    return ACTIVE is not None and not ACTIVE.finished


#: How long disabling Kiln waits for a running job to hand over its last texture, as Cancel does.
STOP_WAIT_S = 3.0


def stop_running_job(why: str) -> None:
    """End the running job now (Kiln is being disabled, or updated): cancelled, and given a moment
    to keep its last texture as Cancel does, else abandoned. Left running, it held the panel and
    refused every later job ("a Kiln job is running") until Blender restarted."""
    if not _running():
        return
    ACTIVE.cancel()
    deadline = time.monotonic() + STOP_WAIT_S
    while not ACTIVE.finished and time.monotonic() < deadline:
        ACTIVE.pump(timeout=0.05)
    if not ACTIVE.finished:
        ACTIVE.abandon(why)


def _redraw(context: bpy.types.Context) -> None:
    for window in context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "IMAGE_EDITOR", "PROPERTIES"):
                area.tag_redraw()


class _WhenIdle:
    """For operators that would pull the backend out from under a running job."""

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if _running():
            cls.poll_message_set("A Kiln job is running: wait for it or cancel it")
            return False
        return True


class _SessionOperator(_WhenIdle):
    """Runs one session: blocking in ``execute`` (background mode, scripts), modal from the UI."""

    def _make_session(self, context: bpy.types.Context) -> sessions.TextureSession:
        raise NotImplementedError

    def _session(self, context: bpy.types.Context) -> sessions.TextureSession | None:
        global ACTIVE, REFUSAL
        try:
            ACTIVE = self._make_session(context)
        except SceneError as exc:
            REFUSAL = exc.with_traceback(None)  # its frames would keep the scene data they saw
            self.report({"ERROR"}, str(exc))
            return None
        REFUSAL = None
        ACTIVE.start()
        return ACTIVE

    def execute(self, context: bpy.types.Context) -> set[str]:
        session = self._session(context)
        if session is None:
            return {"CANCELLED"}
        tenth, phases, interrupted = -1, set(), False
        try:
            while not session.finished:
                session.pump(timeout=0.1)
                fraction, text = session.progress()
                # For batch logs, a console line per tenth and per phase first seen (its text less the counts).
                phase = re.sub(r" · ETA.*|[\d.]+", "", text)
                if not session.finished and (int(fraction * 10) != tenth or phase not in phases):
                    tenth = int(fraction * 10)
                    phases.add(phase)
                    print(f"Kiln {fraction:.0%} · {text}", flush=True)
        except KeyboardInterrupt:
            interrupted = True
            session.cancel()
            while not session.finished:
                session.pump(timeout=0.1)
        return self._end(session, interrupted)

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        if self._session(context) is None:
            return {"CANCELLED"}
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.05, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        session = ACTIVE
        if event.type == "ESC" and event.value == "PRESS":
            session.cancel()
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        session.pump()
        fraction, text = session.progress()
        context.workspace.status_text_set(f"Kiln {fraction:.0%} · {text}  (Esc to cancel)")
        _redraw(context)
        if not session.finished:
            return {"PASS_THROUGH"}
        context.window_manager.event_timer_remove(self._timer)
        context.workspace.status_text_set(None)
        return self._end(session)

    def cancel(self, context: bpy.types.Context) -> None:
        """Blender ends a modal operator this way when it cannot go on (another file opened, the
        window closed): the job must end too, or it would hold the panel as running for good."""
        if _running():
            ACTIVE.abandon("stopped: Blender ended the job's operator")
        context.window_manager.event_timer_remove(self._timer)

    def _end(self, session: sessions.TextureSession, interrupted: bool = False) -> set[str]:
        """Reports how the job ended. Ctrl+C ends a script's (a batch run's) job like Esc an
        artist's, but as an error: the script's call raises, so it does not go on, or exit 0, as if
        the job had finished."""
        for note in dict.fromkeys(session.notes):
            self.report({"INFO"}, note)
        if session.succeeded:
            self.report({"INFO"}, f"Kiln: {session.summary()}")
            return {"FINISHED"}
        if session.cancel_requested and not session.failure:
            how = " (Ctrl+C)" if interrupted else ""
            self.report({"ERROR" if interrupted else "WARNING"},
                        f"Kiln cancelled{how}; kept the last result. {session.summary()}")
        else:
            self.report({"ERROR"}, f"Kiln: {session.summary()}")
        return {"FINISHED"} if session.changed_scene else {"CANCELLED"}


@bpy.app.handlers.persistent
def on_file_load(*_args: object) -> None:
    """Opening another file (or File > New) leaves the running job's objects behind, and the new
    file may hold others of the same names: the job ends without painting into them, and the last
    refusal, about an object of the old file, is forgotten."""
    global REFUSAL
    REFUSAL = None
    if _running():
        ACTIVE.abandon("stopped: another file was opened")


@bpy.app.handlers.persistent
def on_save(*_args: object) -> None:
    """Saving mid-job keeps the texture as it stands and no preview (``TextureSession.before_save``)."""
    if _running():
        ACTIVE.before_save()


@bpy.app.handlers.persistent
def on_saved(*_args: object) -> None:
    """After a save, written or failed: the previews come back."""
    if _running():
        ACTIVE.after_save()


@bpy.app.handlers.persistent
def on_file_loaded(*_args: object) -> None:
    """A file saved without the save handlers (an autosave) may hold point previews: no job is
    left to remove them."""
    if names := scene_io.remove_stale_previews():
        print(f"Kiln: removed {', '.join(names)}, left in the file by a generation that never finished")


def job_request(context: bpy.types.Context) -> tuple[dict, dict]:
    """The job's fields from the panel, and the arrays every job of the run shares (a reference object)."""
    settings, prefs = context.scene.kiln, preferences(context)
    fields, arrays = sessions.reference_fields(settings, library_fields(prefs))
    return {**sessions.read_settings(settings), **fields, "low_vram": prefs.low_vram}, arrays


JobSession = TypeVar("JobSession", bound=sessions.TextureSession)


def _out_of_edit_mode(context: bpy.types.Context, make: Callable[[], JobSession], why: str) -> JobSession:
    """``make`` a job's session in Object Mode. Artists pick faces in Edit Mode and often stay
    there, but a mesh in Edit Mode takes no UV map or material from a job (leaving writes its own
    copy back) and objects are added in Object Mode: the job leaves it, and a refusal goes back so
    the artist stays where they were."""
    editing = context.mode.startswith("EDIT")
    if editing:
        bpy.ops.object.mode_set(mode="OBJECT")
    try:
        session = make()
    except SceneError:
        if editing:
            bpy.ops.object.mode_set(mode="EDIT")
        raise
    if editing:
        session.notes.append(f"Kiln left Edit Mode, {why}: Tab returns to it")
    return session


class KILN_OT_texture_selected(_SessionOperator, bpy.types.Operator):
    """Texture the selected meshes from the prompt, live, with the Kiln backend"""

    bl_idname = "kiln.texture_selected"
    bl_label = "Texture Selected"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if not super().poll(context):
            return False
        if not any(o.type == "MESH" for o in context.selected_objects):
            why = ""
            if context.selected_objects:  # what the selection is instead, and how to make it a mesh
                try:
                    scene_io.check_object(context.selected_objects[0])
                except SceneError as error:
                    why = f": {error}"
            cls.poll_message_set(f"Select one or more mesh objects{why}")
            return False
        return True

    def _make_session(self, context: bpy.types.Context) -> sessions.TextureSession:
        def make() -> sessions.TextureSession:
            fields, arrays = job_request(context)
            objects = sorted(context.selected_objects, key=lambda o: o.name)
            settings = context.scene.kiln
            return sessions.TextureSession(objects, fields, backend_choice(context), refine=settings.refine,
                                           selected_faces=settings.selected_faces, shared_arrays=arrays)
        return _out_of_edit_mode(context, make, "where a mesh cannot take a job's results")


class KILN_OT_generate_object(_SessionOperator, bpy.types.Operator):
    """Generate a new textured object from the prompt at the 3D cursor, with a live preview"""

    bl_idname = "kiln.generate_object"
    bl_label = "Generate Object"
    bl_options = {"REGISTER", "UNDO"}

    def _make_session(self, context: bpy.types.Context) -> sessions.GenerateSession:
        def make() -> sessions.GenerateSession:
            if context.mode != "OBJECT":
                raise SceneError("switch to Object Mode first: Kiln adds the generated object to the scene",
                                 "object_mode", context.active_object)
            fields, arrays = job_request(context)
            return sessions.GenerateSession(fields, backend_choice(context), context.scene.cursor.location,
                                            shared_arrays=arrays)
        return _out_of_edit_mode(context, make, "to add the generated object")


class KILN_OT_index_libraries(_SessionOperator, bpy.types.Operator):
    """Index the asset libraries set in Kiln's preferences (captions, thumbnails, embeddings), so Use
    References can find assets by prompt. Only new and changed files are read again"""

    bl_idname = "kiln.index_libraries"
    bl_label = "Index Libraries"
    bl_options = {"REGISTER"}

    def _make_session(self, context: bpy.types.Context) -> sessions.IndexSession:
        prefs = preferences(context)
        return sessions.IndexSession(library_fields(prefs), blend_folders(context), backend_choice(context))


class KILN_OT_find_references(_SessionOperator, bpy.types.Operator):
    """Search your indexed asset libraries for the assets nearest the prompt, to pick references from"""

    bl_idname = "kiln.find_references"
    bl_label = "Find References"
    bl_options = {"REGISTER", "UNDO"}

    def _make_session(self, context: bpy.types.Context) -> sessions.SearchSession:
        prefs = preferences(context)
        return sessions.SearchSession(context.scene.kiln, library_fields(prefs), backend_choice(context))


class KILN_OT_clear_references(bpy.types.Operator):
    """Forget the found references: jobs then take the assets nearest their prompt"""

    bl_idname = "kiln.clear_references"
    bl_label = "Clear References"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        context.scene.kiln.hits.clear()
        return {"FINISHED"}


class KILN_OT_add_library(bpy.types.Operator):
    """Add an asset folder to Kiln's libraries"""

    bl_idname = "kiln.add_library"
    bl_label = "Add Library"
    bl_options = {"INTERNAL"}

    def execute(self, context: bpy.types.Context) -> set[str]:
        preferences(context).libraries.add()
        context.preferences.is_dirty = True
        return {"FINISHED"}


class KILN_OT_remove_library(bpy.types.Operator):
    """Remove this folder from Kiln's libraries (its files and index stay on disk)"""

    bl_idname = "kiln.remove_library"
    bl_label = "Remove Library"
    bl_options = {"INTERNAL"}

    index: bpy.props.IntProperty()

    def execute(self, context: bpy.types.Context) -> set[str]:
        libraries = preferences(context).libraries
        if 0 <= self.index < len(libraries):
            libraries.remove(self.index)
            context.preferences.is_dirty = True
        return {"FINISHED"}


class KILN_OT_cancel(bpy.types.Operator):
    """Stop the running Kiln job, keeping the last texture it produced"""

    bl_idname = "kiln.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return _running()

    def execute(self, context: bpy.types.Context) -> set[str]:
        ACTIVE.cancel()
        return {"FINISHED"}


def _in_background(work: Callable[[], str]) -> None:
    """Run backend control work off the main thread; its outcome goes to the console."""
    def run() -> None:
        try:
            print(f"Kiln: {work()}")
        except (BackendError, OSError, protocol.ProtocolError) as exc:
            print(f"Kiln: {exc}")
    threading.Thread(target=run, name="kiln-backend-control", daemon=True).start()


class KILN_OT_start_backend(bpy.types.Operator):
    """Start the Kiln backend now (or connect to the running one), so the first job does not wait"""

    bl_idname = "kiln.start_backend"
    bl_label = "Start Backend"

    def execute(self, context: bpy.types.Context) -> set[str]:
        choice, offline = backend_choice(context), not getattr(bpy.app, "online_access", True)

        def start() -> str:
            backend = sessions.MANAGER.ensure(choice, offline)
            backend.connect(queue.Queue()).close()  # a standing one named by a stale file fails here, with the fix
            return f"backend {backend.describe()}"
        _in_background(start)
        return {"FINISHED"}


class KILN_OT_stop_backend(_WhenIdle, bpy.types.Operator):
    """Stop the Kiln backend and free the memory its models hold"""

    bl_idname = "kiln.stop_backend"
    bl_label = "Stop Backend"

    def execute(self, context: bpy.types.Context) -> set[str]:
        def stop() -> str:
            standing = isinstance(sessions.MANAGER.process, StandingBackend)
            sessions.MANAGER.stop()
            return "disconnected; the backend started outside Blender keeps running" if standing else "backend stopped"
        _in_background(stop)
        return {"FINISHED"}


class KILN_OT_unload_models(_WhenIdle, bpy.types.Operator):
    """Free the GPU memory the backend's cached models hold (they reload on the next job)"""

    bl_idname = "kiln.unload_models"
    bl_label = "Unload Models"

    def execute(self, context: bpy.types.Context) -> set[str]:
        _in_background(sessions.MANAGER.unload_models)
        return {"FINISHED"}


#: The Set Up Backend button's install, while it runs and after (the preferences show its outcome).
SETUP: EnvironmentSetup | None = None


def setup_folder() -> Path:
    """The backend's environment made by the button: in Kiln's user folder, which outlives add-on
    updates (the add-on's own folder is replaced on each)."""
    return Path(bpy.utils.extension_path_user(__package__, path="backend-env", create=True))


class KILN_OT_setup_backend(bpy.types.Operator):
    """Download and install the backend's Python environment: PyTorch, diffusers and Kiln's other
    dependencies, several GB. Kiln then starts its backend from it"""

    bl_idname = "kiln.setup_backend"
    bl_label = "Set Up Backend"

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if SETUP is not None and not SETUP.done.is_set():
            cls.poll_message_set("The backend is being set up")
            return False
        return True

    def invoke(self, context: bpy.types.Context, event: bpy.types.Event) -> set[str]:
        return context.window_manager.invoke_confirm(
            self, event, title="Set Up Kiln's Backend", confirm_text="Download and Install", icon="IMPORT",
            message=f"Download PyTorch, diffusers and Kiln's other dependencies (several GB) into {setup_folder()}?")

    def execute(self, context: bpy.types.Context) -> set[str]:
        global SETUP
        if not bpy.app.online_access:
            self.report({"ERROR"}, "Blender is set to work offline, and setting up the backend downloads several GB: "
                                   "allow it in Preferences > System > Network, or run `python3 build.py setup` from "
                                   "Kiln's source")
            return {"CANCELLED"}
        try:
            SETUP = EnvironmentSetup(setup_folder())
        except BackendError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if not bpy.app.background:
            bpy.app.timers.register(_watch_setup, first_interval=0.5)
            return {"FINISHED"}
        SETUP.done.wait()  # scripts and background mode: the call returns when the install has ended
        if not _adopt_setup(context):
            self.report({"ERROR"}, SETUP.error)
            return {"CANCELLED"}
        self.report({"INFO"}, f"Kiln's backend is set up: {SETUP.python}")
        return {"FINISHED"}


def stop_setup() -> None:
    """Blender quits or Kiln is disabled: no install carries on unseen (the next one completes it)."""
    if bpy.app.timers.is_registered(_watch_setup):
        bpy.app.timers.unregister(_watch_setup)
    if SETUP is not None:
        SETUP.stop()


atexit.register(lambda: SETUP.stop() if SETUP is not None else None)


def _adopt_setup(context: bpy.types.Context) -> bool:
    """Point the add-on at the environment the button made; False when the install failed."""
    if SETUP is None or SETUP.python is None:
        return False
    preferences(context).python_path = str(SETUP.python)
    sessions.MANAGER.stop()  # a backend from another environment gives way to the new one at the next job
    return True


def _watch_setup() -> float | None:
    """Timer: keep the preferences' progress line fresh; adopt the environment when it is ready."""
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in ("PREFERENCES", "VIEW_3D"):  # the preferences and the panel show its step
                area.tag_redraw()
    if SETUP is None or not SETUP.done.is_set():
        return 0.5
    print(f"Kiln: backend set up: {SETUP.python}" if _adopt_setup(bpy.context) else f"Kiln: {SETUP.error}")
    return None


class KILN_OT_copy_diagnostics(bpy.types.Operator):
    """Copy the backend's recent console output, for a bug report"""

    bl_idname = "kiln.copy_diagnostics"
    bl_label = "Copy Diagnostics"

    def execute(self, context: bpy.types.Context) -> set[str]:
        text = sessions.MANAGER.diagnostics()
        context.window_manager.clipboard = text
        self.report({"INFO"}, f"Copied the backend's status and its last {len(text.splitlines()) - 1} lines of output")
        return {"FINISHED"}


def hides_textures(space: Any) -> bool:
    """Whether a 3D view's shading leaves Kiln's textures unseen: Wireframe, or Solid colouring by
    anything but texture (Blender's default), where an artist would watch a job change nothing."""
    if getattr(space, "type", None) != "VIEW_3D":
        return False
    shading = space.shading
    return shading.type == "WIREFRAME" or (shading.type == "SOLID" and shading.color_type != "TEXTURE")


class KILN_OT_show_textures(bpy.types.Operator):
    """Switch this view to Material Preview, where Kiln's textures show as they are made (its
    Solid shading shows colours, not textures)"""

    bl_idname = "kiln.show_textures"
    bl_label = "Show Textures"
    bl_options = {"REGISTER"}  # a view setting, not scene data: nothing to undo

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        return getattr(context.space_data, "type", None) == "VIEW_3D"

    def execute(self, context: bpy.types.Context) -> set[str]:
        context.space_data.shading.type = "MATERIAL"
        return {"FINISHED"}


class KILN_OT_restore_materials(bpy.types.Operator):
    """Put back the materials the selected objects had before Kiln textured them (Kiln's images
    stay saved in kiln_textures)"""

    bl_idname = "kiln.restore_materials"
    bl_label = "Restore Materials"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context: bpy.types.Context) -> bool:
        if _running():
            cls.poll_message_set("Wait for the job to end, or cancel it")
            return False
        if not any(scene_io.PREVIOUS_MATERIALS in o for o in context.selected_objects):
            cls.poll_message_set("Select objects that Kiln textured")
            return False
        return True

    def execute(self, context: bpy.types.Context) -> set[str]:
        restored = [o.name for o in context.selected_objects if scene_io.restore_materials(o)]
        self.report({"INFO"}, f"Kiln: restored the materials of {', '.join(restored)}")
        return {"FINISHED"}


CLASSES = (KILN_OT_texture_selected, KILN_OT_generate_object, KILN_OT_index_libraries, KILN_OT_find_references,
           KILN_OT_clear_references, KILN_OT_add_library, KILN_OT_remove_library, KILN_OT_cancel,
           KILN_OT_start_backend, KILN_OT_stop_backend, KILN_OT_unload_models, KILN_OT_setup_backend,
           KILN_OT_copy_diagnostics, KILN_OT_show_textures, KILN_OT_restore_materials)
