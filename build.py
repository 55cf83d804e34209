#!/usr/bin/env python3
"""Build Kiln's Blender extension zip, or set up the backend environment.

    python3 build.py                 # dist/kiln-<version>.zip, validated by Blender's own checker
    python3 build.py setup [--dev]   # .venv with the backend's dependencies (+ pytest, rtree with --dev)
    python3 build.py test            # setup --dev, the backend's tests, then the Blender tests under each bpy

The zip holds the add-on (``blender_addon/`` at its root) and a copy of ``backend/``: the add-on
imports the shared wire protocol from it, and launches it with the backend environment's Python,
so the two sides always come from the same Kiln version.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from backend.environment import create, make_venv, pip_install, venv_python  # noqa: E402  (stdlib only)

VENV = ROOT / ".venv"
#: The Blenders the add-on is tested in, each in its own environment beside the backend's: a bpy
#: pins its own numpy (5.0.1's < 2), which must not decide what the backend is tested with.
BLENDER_ENVS = {".venv-blender": "bpy==5.0.1", ".venv-blender-min": "bpy==4.2.23"}
#: The test runner, in the backend's environment and in each Blender's.
TEST_TOOLS = ["pytest>=8", "pytest-timeout>=2.3"]
#: Seconds one test may take (the slowest, the speed bench's smoke run, takes about 140 s here): a
#: hung test fails with its stack instead of stalling the run.
TEST_TIMEOUT = "--timeout=900"
#: What the benches need beyond the backend, in its environment: trimesh's closest-point queries
#: (exact point-to-surface distances for Chamfer) index triangles with rtree.
BENCH_TOOLS = ["rtree>=1.3"]


def manifest_version() -> str:
    text = (ROOT / "blender_manifest.toml").read_text(encoding="utf-8")
    match = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if not match:
        sys.exit("build.py: blender_manifest.toml has no version")
    return match.group(1)


def _package_files() -> list[tuple[Path, str]]:
    files = [(ROOT / "blender_manifest.toml", "blender_manifest.toml"), (ROOT / "README.md", "README.md")]
    for src, prefix in ((ROOT / "blender_addon", ""), (ROOT / "backend", "backend/")):
        for path in sorted([*src.rglob("*.py"), *src.glob("requirements*.txt")]):  # the add-on's Set Up
            if "__pycache__" not in path.parts:
                files.append((path, prefix + path.relative_to(src).as_posix()))
    return files


def build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"kiln-{manifest_version()}.zip"
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, arcname in _package_files():
            zf.write(path, arcname)
    return target


_BPY_ORIGIN = "import importlib.util as u; s = u.find_spec('bpy'); print(s.origin if s else '')"


def _bpy_validator(python: Path) -> list[str] | None:
    """The bpy module's copy of Blender's extension CLI, run by the Python that has the module.
    Found through the module's spec, without importing it (that starts Blender)."""
    spec = subprocess.run([str(python), "-c", _BPY_ORIGIN], capture_output=True, text=True).stdout.strip()
    # The wheel holds bpy/<version>/scripts/, and the CLI sits beside the core add-ons there.
    clis = sorted(Path(spec).parent.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py")) if spec else []
    return [str(python), str(clis[-1]), "validate"] if clis else None


def _blender_validator() -> list[str] | None:
    """Blender's own `extension validate`: from a blender binary, else from a bpy module in this
    Python or in one of the Blender test environments."""
    blender = shutil.which("blender")
    if blender:
        return [blender, "--factory-startup", "--command", "extension", "validate"]
    pythons = [Path(sys.executable), *(venv_python(ROOT / folder) for folder in BLENDER_ENVS)]
    return next((command for python in pythons if python.exists() and (command := _bpy_validator(python))), None)


def validate(zip_path: Path) -> bool:
    command = _blender_validator()
    if command is None:
        print("build.py: no Blender found (a blender binary, or the bpy module here or in the environments "
              "`build.py test` makes); the zip was not validated")
        return False
    result = subprocess.run([*command, str(zip_path)], capture_output=True, text=True)
    print((result.stdout + result.stderr).strip())
    if result.returncode != 0:
        sys.exit(f"build.py: Blender rejected {zip_path.name}")
    return True


def setup(dev: bool, device: str) -> Path:
    """Create .venv with the backend's dependencies and record it for the add-on. The checkout goes
    on its path too, so that a pipeline's `.venv/bin/python -m backend ...` runs from any folder (it
    said "No module named backend" outside this one); a folder holding a backend of its own, as
    the add-on's does for the backend Blender starts, still comes first."""
    python = create(VENV, device, [*TEST_TOOLS, *BENCH_TOOLS] if dev else [])
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "kiln-checkout.pth").write_text(f"{ROOT}\n", encoding="utf-8")
    return python


def test() -> int:
    """The backend's tests in its own environment, then the Blender tests under each Blender, each
    driving a backend subprocess from the backend's environment (the add-on's real arrangement)."""
    backend_python = setup(dev=True, device="auto")
    codes = [subprocess.run([str(backend_python), "-m", "pytest", "-q", TEST_TIMEOUT, "--durations=12", "tests",
                             "--ignore=tests/test_blender.py"], cwd=ROOT).returncode]
    env = dict(os.environ, KILN_BACKEND_PYTHON=str(backend_python))
    for folder, bpy_pin in BLENDER_ENVS.items():
        blender_python = make_venv(ROOT / folder)
        subprocess.run([*pip_install(blender_python), bpy_pin, *TEST_TOOLS], check=True)
        print(f"Blender tests under {bpy_pin} ({folder}), with the backend in {backend_python}:", flush=True)
        codes.append(subprocess.run([str(blender_python), "-m", "pytest", "-q", TEST_TIMEOUT, "tests/test_blender.py"],
                                    cwd=ROOT, env=env).returncode)
    return next((code for code in codes if code), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("setup", help="create the backend environment in .venv")
    s.add_argument("--dev", action="store_true",
                   help="also install the test runner (pytest) and what the benches need (rtree)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    sub.add_parser("test", help="set up with test tools and run every test (Blender's under bpy 5.0.1 and 4.2)")
    b = sub.add_parser("zip", help="build the extension zip (the default)")
    b.add_argument("--out", type=Path, default=ROOT / "dist")
    args = parser.parse_args()
    if args.command == "setup":
        setup(args.dev, args.device)
        return
    if args.command == "test":
        sys.exit(test())
    zip_path = build(getattr(args, "out", ROOT / "dist"))
    validate(zip_path)
    print(zip_path)


if __name__ == "__main__":
    main()
