"""The backend's Python environment: a venv with Kiln's dependencies. One recipe, used by
``build.py setup`` in a checkout and by the add-on's Set Up Backend button, which runs this module
with Blender's own Python from the installed extension (whose zip carries it and the requirements).

    python -m backend.environment VENV [--device auto|cpu|cuda] [--extra PACKAGE ...]

Standard library only: it runs before any dependency exists. Each step prints a ``kiln-setup:``
line (the add-on shows the latest); a failed step exits 1 with pip's own output above it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .protocol import user_folder

HERE = Path(__file__).resolve().parent
#: Read by the add-on (``backend_process.find_python``) when its Backend Python preference is empty.
POINTER_FILE = user_folder() / "backend-python"
#: The CPU build of torch Kiln is tested with; an unpinned torch pulls GBs of CUDA wheels.
CPU_TORCH = "torch==2.13.0"
#: PyPI's torch for Windows is CPU-only; PyTorch's own index has the CUDA builds (their versions'
#: local label, ``+cu128``, ranks them above PyPI's, so pip takes them with PyPI still consulted).
CUDA_TORCH_INDEX = "https://download.pytorch.org/whl/cu128"
#: Since torch 2.8 only the CUDA 12.6 builds carry kernels for cards before Turing (Maxwell, Pascal,
#: Volta: GTX 900 and 10 series, Titan V): with any other build such a card fails the first job
#: with "no kernel image is available for execution on the device".
LEGACY_TORCH_INDEX = "https://download.pytorch.org/whl/cu126"
LEGACY_BELOW = (7, 5)


def venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make_venv(path: Path) -> Path:
    """``path``'s interpreter, creating the venv (from this Python) if there is none."""
    python = venv_python(path)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return python


def pip_install(python: Path, progress: bool = False) -> list[str]:
    """pip, quiet; or with ``progress``, a line per package it fetches and installs (no bars: the
    add-on shows the latest line)."""
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check",
            *(["--progress-bar", "off"] if progress else ["-q"])]


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and \
        subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def gpu_capability() -> tuple[int, int] | None:
    """The oldest NVIDIA card's compute capability, as nvidia-smi reports it; None when it cannot
    (no card, or a driver whose nvidia-smi predates the query)."""
    if shutil.which("nvidia-smi") is None:
        return None
    found = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True)
    try:
        return min(tuple(int(part) for part in line.strip().split(".")) for line in found.stdout.splitlines()
                   if line.strip())  # type: ignore[return-value]
    except ValueError:  # "[N/A]", or nothing at all
        return None


def torch_requirement(device: str, platform: str = sys.platform,
                      capability: tuple[int, int] | None = None) -> list[str]:
    """pip's arguments for torch, installed before the rest (so that what depends on torch finds it
    there rather than fetching another build): the pinned CPU build, the CUDA 12.6 build for a card
    of ``capability`` older than Turing, else the CUDA build for this platform."""
    if device != "cuda":
        return [CPU_TORCH]
    if capability is not None and capability < LEGACY_BELOW:  # only that index: PyPI's newer torch lacks it
        return ["torch", "--index-url", LEGACY_TORCH_INDEX]
    return ["torch", "--extra-index-url", CUDA_TORCH_INDEX] if platform == "win32" else ["torch"]


def create(venv: Path, device: str = "auto", extra: Sequence[str] = (), progress: bool = False) -> Path:
    """Make (or complete) the environment, record it for the add-on, and return its Python."""
    if sys.version_info < (3, 10):
        sys.exit("kiln-setup: Python 3.10 or newer is needed for the backend")
    if device == "auto":
        device = "cuda" if has_nvidia_gpu() else "cpu"
    step(1, f"creating the environment in {venv}")
    python = make_venv(venv)
    pip = pip_install(python, progress)
    step(2, f"installing PyTorch ({device}) and Kiln's dependencies: several GB the first time, minutes")
    subprocess.run([*pip, *torch_requirement(device, capability=gpu_capability() if device == "cuda" else None)],
                   check=True)
    subprocess.run([*pip, "-r", str(HERE / "requirements.txt"), *extra], check=True)
    if device == "cuda":
        subprocess.run([*pip, "-r", str(HERE / "requirements-cuda.txt")], check=True)
    step(3, "recording it for the add-on")
    POINTER_FILE.parent.mkdir(parents=True, exist_ok=True)
    POINTER_FILE.write_text(str(python), encoding="utf-8")
    print(f"Kiln backend environment ready ({device}): {python}\nRecorded in {POINTER_FILE} for the add-on.",
          flush=True)
    return python


def step(number: int, what: str) -> None:
    print(f"kiln-setup: step {number}/3: {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.environment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("venv", type=Path)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--extra", nargs="*", default=[], help="more packages to install with the dependencies")
    parser.add_argument("--progress", action="store_true", help="pip names each package as it goes")
    args = parser.parse_args(argv)
    try:
        create(args.venv, args.device, args.extra, args.progress)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"kiln-setup: failed: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
