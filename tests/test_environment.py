"""The backend environment's recipe (backend/environment.py): what it asks pip for, per machine,
and what the backend makes of the machine's GPU (backend/gpu.py). The recipe's whole run is
exercised by `build.py setup` in every CI run and by the Set Up Backend test."""

from __future__ import annotations

import subprocess
import types

import pytest
import torch

from backend import environment
from backend import gpu as gpu_module
from backend.environment import CPU_TORCH, CUDA_TORCH_INDEX, LEGACY_TORCH_INDEX, torch_requirement
from backend.jobs import describe_failure


def test_torch_comes_from_where_each_machine_gets_a_build_that_uses_its_gpu() -> None:
    assert torch_requirement("cpu", "linux") == torch_requirement("cpu", "win32") == [CPU_TORCH]
    assert torch_requirement("cuda", "linux") == ["torch"]  # PyPI's Linux wheels carry CUDA
    # PyPI's Windows wheels are CPU-only: an NVIDIA card would sit idle without PyTorch's index.
    assert torch_requirement("cuda", "win32") == ["torch", "--extra-index-url", CUDA_TORCH_INDEX]


def test_cards_before_turing_get_the_last_torch_build_with_their_kernels(monkeypatch) -> None:
    """Since torch 2.8 the CUDA 12.8 builds (PyPI's for Linux, PyTorch's index for Windows) lack
    GTX 900/10-series kernels: such a card failed its first job with "no kernel image"."""
    assert torch_requirement("cuda", "linux", (6, 1)) == torch_requirement("cuda", "win32", (7, 0)) \
        == ["torch", "--index-url", LEGACY_TORCH_INDEX]
    assert torch_requirement("cuda", "linux", (7, 5)) == ["torch"]
    assert torch_requirement("cpu", "linux", (6, 1)) == [CPU_TORCH]
    monkeypatch.setattr(environment.shutil, "which", lambda name: f"/usr/bin/{name}")
    for printed, capability in (("8.6\n6.1\n", (6, 1)), ("12.0\n", (12, 0)), ("[N/A]\n", None), ("", None)):
        monkeypatch.setattr(environment.subprocess, "run",
                            lambda *_, _out=printed, **__: subprocess.CompletedProcess([], 0, _out, ""))
        assert environment.gpu_capability() == capability


@pytest.fixture
def gpu(monkeypatch):
    """torch.cuda as a machine with an NVIDIA card shows it (this one has none), and a fresh look."""
    card = types.SimpleNamespace(available=True, capability=(8, 6), archs=["sm_75", "sm_80", "sm_86", "sm_90"],
                                 cuda="12.8", listed=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: card.available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: card.capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: card.archs)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA GeForce GTX 1080")
    monkeypatch.setattr(gpu_module, "has_nvidia_gpu", lambda: card.listed)

    def look():
        monkeypatch.setattr(torch.version, "cuda", card.cuda)
        gpu_module.gpu_problem.cache_clear()
        return gpu_module.gpu_problem()
    yield card, look
    gpu_module.gpu_problem.cache_clear()


def test_a_gpu_torch_cannot_use_is_named_with_its_fix_and_jobs_run_on_the_cpu(gpu) -> None:
    card, look = gpu
    assert look() == "" and gpu_module.default_device().type == "cuda"
    card.capability = (12, 0)  # a newer card: the build's PTX for 9.0 is compiled for it
    card.archs = ["sm_80", "sm_90", "compute_90"]
    assert look() == ""
    card.capability, card.archs = (6, 1), ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    problem = look()
    assert problem.startswith("the NVIDIA GeForce GTX 1080 (compute capability 6.1) is not a card torch")
    assert f"--index-url {LEGACY_TORCH_INDEX}" in problem and gpu_module.default_device().type == "cpu"
    card.capability, card.archs = (12, 0), ["sm_75", "sm_80", "sm_86", "sm_90"]  # newer than the build, no PTX
    assert "a newer torch, built for this card, into the backend's environment" in look()
    assert f"--index-url {CUDA_TORCH_INDEX}" in look()
    card.capability = (6, 1)
    card.available = False  # a CPU build of torch, or a driver older than its CUDA
    card.cuda = None
    assert "is a CPU build" in look() and "--device cuda" in look()
    card.cuda = "12.8"
    assert "update the NVIDIA driver" in look()
    card.listed = False  # no NVIDIA card: the CPU is all there is
    assert look() == ""
    card.available = True
    failure = describe_failure(RuntimeError("CUDA error: no kernel image is available for execution on the device"),
                               False)["message"]
    assert "this GPU has no kernels in the backend's torch" in failure and LEGACY_TORCH_INDEX in failure
