"""The device jobs run on: the GPU when torch can use it, else the CPU, saying why on a machine
that has an NVIDIA card.

torch's own signs come late and in its words. A CPU build of torch, or a driver older than torch's
CUDA, leaves jobs crawling on the CPU without a word; a card the build has no kernels for (GTX 900
and 10 series, Titan V, with the CUDA 12.8 and later builds) passes ``torch.cuda.is_available()``
and fails the first job with "no kernel image is available for execution on the device".
``gpu_problem`` names each with its fix, and such a card is left alone for the CPU.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .environment import CUDA_TORCH_INDEX, LEGACY_BELOW, LEGACY_TORCH_INDEX, has_nvidia_gpu

#: torch's own words when a kernel is missing for the card, the fallback when ``gpu_problem``
#: did not see it coming (a kernel of nvdiffrast's or gsplat's, built for other cards).
NO_KERNEL = "no kernel image is available"


def has_kernels(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether a build for ``archs`` (``torch.cuda.get_arch_list()``: "sm_86", "compute_90", ...)
    runs on a card of ``capability``: a cubin runs on its major version from its minor up, PTX
    is compiled for any later card."""
    for arch in archs:
        kind, _, digits = arch.partition("_")
        digits = "".join(c for c in digits if c.isdigit())  # "sm_90a" is built for 9.0
        if len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if (kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]) \
                or (kind == "compute" and built <= capability):
            return True
    return False


def _kernel_fix(capability: tuple[int, int] | None) -> str:
    """How to get a torch with kernels for a card of ``capability``: an older card needs the last
    build that kept them, a newer one a newer build."""
    index, which = (LEGACY_TORCH_INDEX, "the CUDA 12.6 build of torch, the last with kernels for cards before the "
                    "RTX 20 series,") if capability is None or capability < LEGACY_BELOW else \
        (CUDA_TORCH_INDEX, "a newer torch, built for this card,")
    return (f"install {which} into the backend's environment (`python -m pip install --force-reinstall torch "
            f"--index-url {index}` with its Python), or set up the backend again")


@lru_cache(maxsize=1)
def gpu_problem() -> str:
    """Why jobs run on the CPU of a machine with an NVIDIA card, with the fix; "" when they run on
    the GPU, or there is no card. Looked up once: it asks the driver, and nvidia-smi."""
    if torch.cuda.is_available():
        capability, archs = torch.cuda.get_device_capability(), torch.cuda.get_arch_list()
        if not archs or has_kernels(capability, archs):
            return ""
        return (f"the {torch.cuda.get_device_name()} (compute capability {capability[0]}.{capability[1]}) is not a "
                f"card torch {torch.__version__} has kernels for ({' '.join(archs)}), so jobs run on the CPU, "
                f"far slower: {_kernel_fix(capability)}")
    if not has_nvidia_gpu():  # (a driver too old to report its card's capability still lists the card)
        return ""
    if torch.version.cuda is None:
        return (f"this machine has an NVIDIA card, but the backend's torch {torch.__version__} is a CPU build, so "
                "jobs run on the CPU, far slower: set up the backend again (Set Up Backend, or `python -m "
                "backend.environment ENV --device cuda`)")
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use this machine's NVIDIA card, so jobs run "
            "on the CPU, far slower: update the NVIDIA driver (one older than torch's CUDA is the usual cause), then "
            "restart the backend")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not gpu_problem() else "cpu")


def device_label() -> str:
    """What jobs run on, in words: the GPU's name, or "cpu" (Blender's panel, result.json)."""
    return torch.cuda.get_device_name() if default_device().type == "cuda" else "cpu"


def no_kernel_fix(text: str) -> str | None:
    """The fix for torch's missing-kernel error, when ``text`` is one."""
    if NO_KERNEL not in text:
        return None
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return f"this GPU has no kernels in the backend's torch {torch.__version__}: {_kernel_fix(capability)}"
