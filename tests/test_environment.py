"""The backend environment's recipe (backend/environment.py): what it asks pip for, per machine.
Its whole run is exercised by `build.py setup` in every CI run and by the Set Up Backend test."""

from __future__ import annotations

from backend.environment import CPU_TORCH, CUDA_TORCH_INDEX, torch_requirement


def test_torch_comes_from_where_each_machine_gets_a_build_that_uses_its_gpu() -> None:
    assert torch_requirement("cpu", "linux") == torch_requirement("cpu", "win32") == [CPU_TORCH]
    assert torch_requirement("cuda", "linux") == ["torch"]  # PyPI's Linux wheels carry CUDA
    # PyPI's Windows wheels are CPU-only: an NVIDIA card would sit idle without PyTorch's index.
    assert torch_requirement("cuda", "win32") == ["torch", "--extra-index-url", CUDA_TORCH_INDEX]
