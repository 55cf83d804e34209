"""The benchmark scripts still run and write sane results (their figures are judged in notes, not
here: these check that the scripts work, not how fast anything is)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import torch
from conftest import ROOT


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_quality_bench_quick_run_writes_its_table() -> None:
    result = run_bench("bench/quality.py", "--quick")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Targets (this run):" in result.stdout
    rows = list(csv.DictReader(open(ROOT / "bench" / "results" / "quality_summary.csv")))
    assert {r["method"] for r in rows} == {"SIR", "SDS cfg100", "SDS cfg7.5", "SSD cfg7.5"}
    sir = next(r for r in rows if r["case"] == "crate" and r["method"] == "SIR")
    assert float(sir["psnr"]) > 25 and 0 < float(sir["coverage"]) <= 1
    assert (ROOT / "bench" / "results" / "quality.png").stat().st_size > 10_000


def test_quality_bench_repaint_run_compares_facing_views_with_the_whole_ring() -> None:
    result = run_bench("bench/quality.py", "--repaint", "--quick")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["views"]: r for r in csv.DictReader(open(ROOT / "bench" / "results" / "repaint.csv"))}
    facing, ring = rows["facing"], rows["whole ring"]
    assert float(facing["arc_deg"]) < 360 and float(ring["arc_deg"]) == 360
    assert facing["images_denoised"] == ring["images_denoised"] and int(facing["painted_pixels"]) > 0
    assert float(facing["psnr_repainted"]) > float(ring["psnr_repainted"]) > 20


def test_speed_bench_cpu_small_reports_every_stage() -> None:
    # Its unwrap part (500k faces, about two minutes here) is checked on small meshes below.
    result = run_bench("bench/speed.py", "--cpu-small", "--parts", "jobs,models,vae,layout,raster,splat,generate",
                       "--families", "sd15-controlnet-depth,sd2-depth,sd15-lcm-lora", "--sizes", "512")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((ROOT / "bench" / "results" / "speed.json").read_text())
    assert report["unwrap"] == []
    # Every way a family differs from SD 1.5 runs through a real job: a ControlNet, a depth channel, a few-step kind.
    assert [(r["family"], r["depth"], r["preset"]) for r in report["models"]] == [
        ("sd15-controlnet-depth", "controlnet", "pipeline-check"), ("sd2-depth", "channel", "pipeline-check"),
        ("sd15-lcm-lora", None, "lcm")]
    for row in report["models"]:
        assert row["images_denoised"] > 0 and 0 < row["unet_share"] < 1 and row["weights_gib"] > 0
        assert "rendering" in row["stages"] and row["peak_vram_gib"] is None  # no VRAM on a CPU
    assert {job["method"] for job in report["jobs"]} == {"sir", "sds", "ssd"}
    for job in report["jobs"]:
        assert job["unet_calls"] > 0 and 0 < job["unet_share"] < 1
        assert {"UNet", "VAE", "rendering", "in-painting + padding"} <= set(job["stages"])
    low = [job for job in report["jobs"] if job["low_vram"]]
    assert len(low) == 1 and low[0]["method"] == "sir"
    assert [job["method"] for job in report["jobs"] if job["vae"] == "TAESD"] == ["sir"]
    sd, taesd = report["vae"]
    assert (sd["vae"], taesd["vae"]) == ("SD", "TAESD") and taesd["parameters_m"] < sd["parameters_m"] / 10
    assert 0 < taesd["decode_ms"] < sd["decode_ms"]
    assert report["first_job_seconds"] > 0
    assert [(row["layout"], row["cudnn_autotune"]) for row in report["layout"]] == [
        ("NCHW", False), ("NHWC", False), ("NCHW", True)]
    for row in report["layout"]:
        assert min(row["unet_ms"], row["encode_ms"], row["decode_ms"], row["job_seconds"]) > 0
    assert report["rasterisers"][0]["ms"] > 0
    assert report["splats"][0]["renderer"] == "torch" and report["splats"][0]["ms_forward_backward"] > 0
    assert {(row["method"], row["vae"]) for row in report["generate"]} == \
        {("sir", "model's"), ("sds", "model's"), ("sir", "TAESD")}
    for row in report["generate"]:
        assert set(row["stages"]) == {"gaussians", "extract", "unwrap", "bake", "refine"}
        assert set(row["extraction"]) == {"density grid", "fill", "marching cubes", "clean-up"}
        assert sum(row["extraction"].values()) <= row["stages"]["extract"] + 0.05
        assert row["images_denoised"] > 0 and row["triangles"] > 0


def test_speed_bench_times_a_job_again_without_its_stage_clock() -> None:
    """The plain run (the lease's figure for the targets) is a whole job again: UVs unwrapped anew,
    low-VRAM mode on for it and off afterwards."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from speed import run_job

    from backend.prior import load_prior

    prior = load_prior("tiny", torch.device("cpu"))
    row = run_job(prior, "sir", "pipeline-check", 5_000, 512, torch.device("cpu"), low_vram=True, plain=True)
    assert row["seconds_plain"] > row["stages"]["UV unwrap"] > 0 and row["images_denoised"] > 0
    assert prior.batch_limit is None


def test_speed_bench_judges_the_targets_on_the_unclocked_time() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import target_lines

    def row(preset: str, seconds: float, vae: str = "model's", low_vram: bool = False, **extra) -> dict:
        return {"method": "sir", "preset": preset, "vae": vae, "low_vram": low_vram, "faces": 50_000,
                "texture": 2048, "seconds": seconds, "unet_share": 0.5, "peak_vram_gib": 6.25, **extra}

    jobs = [row("turbo", 3.63, seconds_plain=2.7), row("quality", 11.99), row("quality", 12.0, "TAESD"),
            row("quality", 24.0, low_vram=True, peak_vram_gib=2.86), row("quality", 9.0) | {"faces": 5000}]
    generated = [{"method": "sir", "preset": "turbo", "vae": "model's", "seconds": 11.7, "peak_vram_gib": 5.68}]
    lines = target_lines(jobs, generated, 50_000, 2048)
    assert lines == [
        "SIR turbo, model's VAE, 50000 faces, 2048²: 2.70 s, target ≤ 3 s: met",
        "SIR quality, model's VAE, 50000 faces, 2048²: 11.99 s, target ≤ 10 s: missed by 20%",
        "  UNet share 50% (target ≥ 80 %); peak VRAM 6.25 GiB (target ≤ 8)",
        "SIR quality, TAESD VAE, 50000 faces, 2048²: 12.00 s, target ≤ 10 s: missed by 20%",
        "SIR quality low-VRAM: peak VRAM 2.86 GiB, target ≤ 6: met",
        "generate, sir turbo, model's VAE: 11.70 s, target ≤ 15 s: met, peak VRAM 5.68 GiB (target ≤ 12)"]


def test_speed_bench_unwrap_rows_compare_pieces_with_one_piece(monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import unwrap_times

    from backend import unwrap

    monkeypatch.setattr(unwrap, "SINGLE_PIECE_FACES", 2_000)  # so 5k faces split (halved to 625 each), as 500k do
    rows = unwrap_times([5_000], one_piece_up_to=5_000)
    assert [(r["surface"], r["pieces"], r["child"]) for r in rows] == [
        (surface, pieces, child) for surface in ("smooth", "rough")
        for pieces, child in ((8, "started for the job"), (8, "spare"), (1, "started for the job"))]
    assert unwrap._spare is None  # no spare left behind
    assert all(r["seconds"] > 0 and 0 < r["uv_area_used"] <= 1 for r in rows)
    assert unwrap.SINGLE_PIECE_FACES == 2_000  # put back after each one-piece row


def test_generate_bench_runs_methods_apart_and_combines_them_with_the_mean_over_seeds(tmp_path) -> None:
    for method, threads in (("sir", "0"), ("sds", "1")):  # 0: torch's own count; 1, as a run beside others would
        result = run_bench("bench/generate.py", "--quick", "--seeds", "3", "4", "--methods", method,
                           "--threads", threads, "--results", str(tmp_path / method))
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Target:" not in result.stdout  # one method alone has nothing to compare
    result = run_bench("bench/generate.py", "--combine", str(tmp_path / "sir"), str(tmp_path / "sds"),
                       "--results", str(tmp_path / "both"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Target: SIR reaches SDS's final Gaussian PSNR and Chamfer" in result.stdout
    assert all(f"{'a crate':<10} {part}" in result.stdout for part in ("seed 3:", "seed 4:", "mean of 2 seeds:"))
    rows = list(csv.DictReader(open(tmp_path / "both" / "generate_summary.csv")))
    assert sorted((r["method"], r["seed"]) for r in rows) == [("sds", "3"), ("sds", "4"), ("sir", "3"), ("sir", "4")]
    sir = next(r for r in rows if r["method"] == "sir")
    assert float(sir["splat_psnr"]) > 15 and 0 < float(sir["chamfer"]) < 0.5 and int(sir["triangles"]) > 0
    assert 0 < int(sir["gaussians_seen"]) <= int(sir["gaussians"])
    # The mean signed distance one way is at most that way's mean distance, which is at most twice Chamfer's.
    assert abs(float(sir["offset"])) <= 2 * float(sir["chamfer"])
    curves = list(csv.DictReader(open(tmp_path / "both" / "generate_curves.csv")))
    assert {(c["method"], c["seed"]) for c in curves} == {("sds", "3"), ("sds", "4"), ("sir", "3"), ("sir", "4")}


def test_retrieval_bench_quick_run_writes_its_tables() -> None:
    result = run_bench("bench/retrieval.py", "--quick")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'a wooden crate' → wooden_crate.glb" in result.stdout
    rows = list(csv.DictReader(open(ROOT / "bench" / "results" / "retrieval.csv")))
    assert {r["reference"] for r in rows} == {"none", "similar (retrieved)", "unrelated"}
    assert {r["method"] for r in rows} == {"SIR", "SDS cfg100", "SDS cfg100 + delta"}
    report = json.loads((ROOT / "bench" / "results" / "retrieval.json").read_text())
    assert [g["reference"] for g in report["generation"]] == ["none", "similar (retrieved)", "unrelated"]
    assert all(0 < g["chamfer"] < 0.5 and g["splat_psnr"] > 10 for g in report["generation"])
    assert report["adaptation"]["train_s"] > report["adaptation"]["cached_s"] > 0
    assert report["indexing"]["assets"] == 50 and report["indexing"]["reused"] == 50
    assert report["query_scale"]["recall_at_10"] > 0.8


def test_channels_last_weights_predict_encode_and_decode_the_same() -> None:
    """The layout part's NHWC weights change the convolutions' memory order, not their numbers, so
    its rows compare equal work; switching back leaves NCHW weights."""
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import set_channels_last

    from backend.prior import load_prior

    prior = load_prior("tiny", torch.device("cpu"))
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompt = prior.encode_prompt("a vase", "")
    before = (*prior.predict_eps(x, 400, prompt, None), prior.encode(images), prior.decode(prior.encode(images)))
    set_channels_last(prior, True)
    conv = next(m for m in prior.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    after = (*prior.predict_eps(x, 400, prompt, None), prior.encode(images), prior.decode(prior.encode(images)))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(before, after))
    set_channels_last(prior, False)
    assert conv.weight.is_contiguous()


def test_the_vae_part_times_a_compiled_vae_that_decodes_as_the_eager_one() -> None:
    """The lease's answer to whether torch.compile pays on SD's VAE: a third row, with the
    compilation's cost and its decoding's distance from the eager decoding's."""
    sys.path.insert(0, str(ROOT / "bench"))
    from speed import vae_times

    sd, taesd, compiled = vae_times(torch.device("cpu"), 1, 64, "default")
    assert (sd["vae"], taesd["vae"], compiled["vae"]) == ("SD", "TAESD", "SD, torch.compile default")
    assert compiled["parameters_m"] == sd["parameters_m"] and compiled["compile_seconds"] > 0
    assert compiled["decode_max_difference"] < 1e-3 and compiled["decode_ms"] > 0
