#!/usr/bin/env bash
# The GPU measurements of issue 6 (speed and VRAM of the SIR presets, generation, the convolution
# settings, a compiled VAE, unwrapping, renderers) in one device call, because a lease is 15
# minutes of device time in all and a fresh machine has none of Kiln's packages beyond torch.
# Two halves:
#
#   bash bench/lease.sh --fetch     here, once: download the wheels the GPU machine lacks into .whl/
#   bash bench/lease.sh             there: device run(command="bash bench/lease.sh", carry=[".whl"],
#                                   timeout_s=590); its steps' limits add up to 535 s; one log,
#                                   JSON and CSV come back under $OUT
#
# Steps run most important first, each under its own time limit, so a slow JIT build costs the
# later steps and not the whole call; the log is written to $OUT as it goes.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# What the device image lacks (its package list: /work/.library/device/KINDS.md), pinned to the
# versions CI tests with.
WHEELS=(diffusers==0.42.1 gsplat==1.5.3 diffrp-nvdiffrast==0.3.3.1 trimesh==5.2.0 xatlas==0.0.11
        fast-simplification==0.2.0)

if [[ "${1:-}" == "--fetch" ]]; then
    mkdir -p .whl
    grep -qx "/.whl/" .gitignore || { echo "lease.sh: .whl/ must be git-ignored" >&2; exit 1; }
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${WHEELS[@]}"
fi

OUT="${OUT:-bench/results/lease}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "lease.sh: no wheels in .whl/ (run bash bench/lease.sh --fetch here, carry .whl)" >&2; exit 1; }
MAX_JOBS=$(nproc)
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS
started=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: run one step with a limit, its output appended to $OUT/lease.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s, $(( $(date +%s) - started )) s in)" | tee -a "$OUT/lease.log"
    rm -f bench/results/speed.json
    # One log for all steps (a call brings back 8 files at most), written as it goes.
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/lease.log" > /tmp/kiln-step.log
    local rc=$?
    tail -n 25 /tmp/kiln-step.log
    echo "== $name: exit $rc" | tee -a "$OUT/lease.log"
    [[ -f bench/results/speed.json ]] && mv bench/results/speed.json "$OUT/$name.json"
    return 0
}

step device 10 bash -c "nvidia-smi; python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'"
# The CUDA-only tests build nvdiffrast's and gsplat's kernels: the JIT cost is paid here, once.
step cuda-tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_render.py tests/test_generate.py \
    -k "cuda or gsplat or nvdiffrast"
# Issue 6's targets: the 50k-face, 2048² texturing jobs (few-step and quality, with the model's
# VAE and with TAESD, low-VRAM), generation, and the VAE alone (2026-12-04, H200: 150 s).
step jobs 180 python3 bench/speed.py --parts jobs,vae,generate --methods sir --faces 50000 --sizes 2048
# The convolution settings (NCHW, NHWC, cuDNN autotuning) on the UNet, the VAE and the few-step job.
step layout 45 python3 bench/speed.py --parts layout --faces 50000 --sizes 2048
# Issue 3's peak VRAM per model family was measured on 2026-12-04 (README) and is left out here:
# python3 bench/speed.py --parts models --faces 50000 --sizes 2048 (100 s on the H200).
# Whether torch.compile pays on SD's VAE, which bounds the UNet's share: 8 views at 512², eager
# against compiled (compiling it took 32 s on two CPU cores here). Issue 3's quality bench ran on
# the H200 on 2026-12-04 and is left out: python3 bench/quality.py --device cuda (about 40 s).
step vae-compile 90 python3 bench/speed.py --parts vae --compile default
# Unwrapping (500k faces: 20 s; a child started for the job against the backend's spare up to
# 50k) and the renderers, at every size.
step renderers 60 python3 bench/speed.py --parts unwrap,raster,splat --faces 5000,50000,500000
echo "lease.sh: done in $(( $(date +%s) - started )) s; lease.log, JSON and CSV in $OUT"
