"""Retrieval-augmented texturing (ReDream) against the exact prior, and the library's speed.

    .venv/bin/python bench/retrieval.py [--quick]

1. Warm-up: the crate of bench/quality.py is textured from a deliberately poor start (a short
   budget: 68-88 images for SIR, 80-160 for SDS) by SIR and SDS with their presets' warm-up,
   without a reference, with the asset the library retrieves for "a wooden crate" (another box,
   its texture a blurred, shifted take on the target, stored turned 90° so the facing step has
   to turn it back), and with an unrelated asset (a vase with another texture). Held-out PSNR to
   the reference at equal NFEs.
2. Indexing: time to index a generated library of 1,000 assets (PLY/OBJ/GLB, thumbnails and
   caption embeddings), and to re-index it when nothing changed.
3. Query scale: 100,000 synthetic caption-like vectors; exact search against usearch's HNSW,
   build time, time per query and recall@10.

Prints tables; writes bench/results/retrieval.csv and retrieval.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality import Case, box_with_own_uvs, pattern, run, vase  # noqa: E402

from backend.assets import load_asset  # noqa: E402
from backend.cli import write_result  # noqa: E402
from backend.embed import WordLlamaEmbedder  # noqa: E402
from backend.library import EXACT_LIMIT, ann_index, build_index, search  # noqa: E402
from backend.mesh import Mesh  # noqa: E402
from backend.presets import PRESETS  # noqa: E402
from backend.reference import ReferenceViews, choose_yaw, prior_facing  # noqa: E402

OUT = ROOT / "bench" / "results"


def rgba(texture: torch.Tensor) -> np.ndarray:
    """(3, S, S) rows bottom-up → (S, S, 4) uint8 as write_result takes it."""
    rgb = (texture.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], 2)


def save_asset(mesh: Mesh, texture: torch.Tensor, folder: Path, name: str) -> Path:
    written = write_result(replace(mesh, name=name), rgba(texture), folder)
    Path(written["texture"]).unlink()  # the GLB embeds its image
    return Path(written["mesh"])


def turned(mesh: Mesh, degrees: float) -> Mesh:
    """The Y-up mesh turned about +Y."""
    a = np.radians(degrees)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]], np.float32)
    return replace(mesh, positions=mesh.positions @ rot.T)


def similar_texture() -> torch.Tensor:
    """The target's pattern, blurred (its fine checker gone) and shifted in colour: close, not equal."""
    blurred = F.avg_pool2d(pattern(0.7, 0.1)[None], 9, stride=1, padding=4, count_include_pad=False)[0]
    return (blurred * torch.tensor([0.9, 1.0, 1.1]).view(3, 1, 1) + 0.03).clamp(0, 1)


def make_library(folder: Path) -> None:
    import trimesh

    crate = box_with_own_uvs()
    bigger = replace(crate, positions=crate.positions * np.array([1.0, 1.08, 1.1], np.float32))
    save_asset(turned(bigger, 90.0), similar_texture(), folder, "wooden_crate")
    save_asset(vase(), pattern(3.0, 0.9), folder, "ceramic_vase")
    save_asset(vase(), pattern(5.0, 0.3), folder, "flower_pot")
    trimesh.creation.cylinder(0.3, 1.0).export(folder / "metal_barrel.ply")
    (folder / "broken_chair.glb").write_bytes(b"not a glTF file")


def warmup_runs(folder: Path, quick: bool) -> list[dict]:
    embedder = WordLlamaEmbedder()
    index, report = build_index(folder, embedder)
    hits = search([index], "a wooden crate", 3, embedder)
    print(f"library: {len(index)} assets, skipped {list(report.skipped)}; 'a wooden crate' → "
          + ", ".join(f"{h.entry.path} ({h.score:.2f})" for h in hits))
    case = Case("crate", box_with_own_uvs(), [pattern(0.7, 0.1)])
    positions, up = case.mesh.positions, case.mesh.up_axis
    face = prior_facing(case.prior, "target", "")
    references = {}
    for label, path in (("similar (retrieved)", hits[0].file), ("unrelated", folder / "ceramic_vase.glb")):
        asset = load_asset(path)
        yaw = choose_yaw(asset, positions, up, face, case.prior.resolution, 1.0, torch.device("cpu"))
        references[label] = (asset.placed(positions, up, yaw), yaw)
        print(f"  {label}: {path.name}, facing chose yaw {yaw:.0f}°")
    views = 4
    sir = replace(PRESETS["sir"]["quality"], views=views, iterations=1, init_recon_steps=30, pad_texels=4,
                  stream_every=5)
    sds = replace(PRESETS["sds"]["quality"], iterations=10, views=views, lr=0.03, pad_texels=4, stream_every=5)
    plan = [("SIR", sir), ("SDS cfg100", sds)]
    if not quick:
        plan += [("SIR", replace(sir, iterations=2)), ("SDS cfg100", replace(sds, iterations=20))]
    rows = []
    for method, cfg in plan:
        for label, ref in (("none", None), *references.items()):
            reference = None if ref is None else ReferenceViews(ref[0], cfg.warmup, case.prior.resolution,
                                                                cfg.background)
            result = run(case, f"{method} / {label}", cfg, "cpu", eval_every=10_000, reference=reference)
            rows.append({"method": method, "reference": label, "images_denoised": result.final["images_denoised"],
                         "psnr": result.final["psnr"], "ssim": result.final["ssim"],
                         "seconds": result.final["seconds"]})
            print(f"  {method:<11} {label:<20} {rows[-1]['images_denoised']:>5} images  "
                  f"PSNR {rows[-1]['psnr']:6.2f} dB  SSIM {rows[-1]['ssim']:.4f}", flush=True)
    return rows


def generated_library(folder: Path, count: int) -> None:
    """``count`` small assets with varied captions and shapes, in the three formats."""
    import trimesh

    rng = np.random.default_rng(0)
    words = ["wooden", "metal", "stone", "red", "old", "small", "tall", "round", "square", "painted"]
    things = ["crate", "barrel", "vase", "lamp", "chair", "table", "box", "pillar", "bottle", "stool"]
    for i in range(count):
        kind = i % 3
        shape = (trimesh.creation.box(extents=rng.uniform(0.3, 1.0, 3)) if kind == 0 else
                 trimesh.creation.cylinder(rng.uniform(0.1, 0.5), rng.uniform(0.3, 1.2), sections=16) if kind == 1
                 else trimesh.creation.icosphere(1, rng.uniform(0.2, 0.6)))
        shape.visual.vertex_colors = (rng.uniform(0, 255, 4) * [1, 1, 1, 0] + [0, 0, 0, 255]).astype(np.uint8)
        name = f"{rng.choice(words)}_{rng.choice(things)}_{i:04d}"
        shape.export(folder / f"{name}.{('ply', 'obj', 'glb')[kind]}")


def index_timing(folder: Path, count: int) -> dict:
    generated_library(folder, count)
    embedder = WordLlamaEmbedder()
    started = time.perf_counter()
    index, report = build_index(folder, embedder)
    first = time.perf_counter() - started
    started = time.perf_counter()
    _, again = build_index(folder, embedder)
    second = time.perf_counter() - started
    started = time.perf_counter()
    for prompt in ("a wooden crate", "tall metal lamp", "round stone vase"):
        search([index], prompt, 5, embedder)
    query = (time.perf_counter() - started) / 3
    return {"assets": len(index), "skipped": len(report.skipped), "index_s": round(first, 2),
            "reindex_unchanged_s": round(second, 3), "reused": again.reused, "query_ms": round(query * 1000, 2)}


def query_scale(n: int, dim: int = 256, queries: int = 200) -> dict:
    """Synthetic caption-like embeddings: unit vectors around 2,000 topic centres (real captions
    cluster by what they name), queries near a topic. One query at a time, as a prompt comes."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    q = centres[rng.integers(0, len(centres), queries)] + 0.6 * rng.standard_normal((queries, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    started = time.perf_counter()
    exact = [np.argpartition(-(vectors @ one), 10)[:10] for one in q]
    exact_s = (time.perf_counter() - started) / queries
    started = time.perf_counter()
    index = ann_index(vectors)
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    found = [index.search(one, 10).keys for one in q]
    ann_s = (time.perf_counter() - started) / queries
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(exact, found, strict=True)])
    return {"vectors": n, "exact_ms_per_query": round(exact_s * 1000, 3), "hnsw_build_s": round(build_s, 2),
            "hnsw_ms_per_query": round(ann_s * 1000, 3), "speedup": round(exact_s / ann_s, 1),
            "recall_at_10": round(float(recall), 4), "exact_limit": EXACT_LIMIT}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small budgets and sizes: a smoke run")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kiln-retrieval-"))
    try:
        (work / "lib").mkdir()
        make_library(work / "lib")
        rows = warmup_runs(work / "lib", args.quick)
        (work / "big").mkdir()
        indexing = index_timing(work / "big", 50 if args.quick else 1000)
        scale = query_scale(10_000 if args.quick else 100_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(OUT / "retrieval.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (OUT / "retrieval.json").write_text(json.dumps({"indexing": indexing, "query_scale": scale}, indent=2))
    print("\nindexing:", json.dumps(indexing))
    print("query scale:", json.dumps(scale))
    print(f"wrote {OUT / 'retrieval.csv'}, {OUT / 'retrieval.json'}")


if __name__ == "__main__":
    main()
