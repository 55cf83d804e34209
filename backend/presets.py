"""Every schedule and hyperparameter of the texturing methods, in one place, as named presets.

Callers pick a method and a preset by name and override single fields (the panel's Steps and
Guidance map to ``iterations`` and ``guidance``); nothing else in the project hard-codes a schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

#: Camera elevations, cycled over a step's views. Measured (bench/quality.py, 3 seeds): against
#: a ring at (20, -10, 45), reaching ±55-60° lifts held-out PSNR by ~6 dB on the crate and ~5 dB
#: on the vase, because tops and bottoms get seen.
ELEVATIONS = (25.0, -25.0, 60.0, -55.0)


@dataclass(frozen=True)
class WarmUp:
    """ReDream's warm-up toward a reference asset's views (used only when a job has a reference):
    the method's loss gains ``weight`` × the same loss against the asset's render, during the first
    ``fraction`` of its updates."""

    weight: float = 1.0
    fraction: float = 0.3


@dataclass(frozen=True)
class Adaptation:
    """ReDream's lightweight adaptation of the prior (used only when a job asks for it): a LoRA of
    the UNet trained on views of the job's references spread over the sphere, each captioned with
    the reference's caption and its view ("…, back view", as view-dependent prompts read), so the
    prior learns how such objects look from every side. Cached per reference set and model."""

    assets: int = 3                 # references a library search returns (ReDream retrieves 3)
    views: int = 100                # renders per reference (ReDream: 100 uniformly sampled cameras)
    rank: int = 4
    steps: int = 300                # early-stopped: enough to learn views, not to copy the assets
    batch: int = 4
    lr: float = 1e-4


@dataclass(frozen=True)
class DeltaDenoising:
    """ReDream's variant of delta denoising (SDS/SSD only, when a job asks for it): every ``every``
    steps the residual on the render loses ``weight`` × the residual on the reference's render at
    the same t and noise — what the prior would change in a good asset is noise, not signal."""

    weight: float = 1.0
    every: int = 3                  # ReDream: every three iterations


_TINY_ADAPTATION = Adaptation(views=8, steps=6, batch=2, lr=1e-3)


@dataclass(frozen=True)
class SIRConfig:
    views: int = 8                  # K cameras per iteration, azimuths evenly spaced
    elevations: tuple[float, ...] = ELEVATIONS
    # Each view's elevation moves by up to this many degrees. Generation's presets measured it; the
    # texturing presets were measured without it.
    elevation_jitter: float = 0.0
    iterations: int = 12            # SIR iterations after the initial sample-from-noise pass
    ddim_steps: int = 10            # DDIM grid over [0, T); an iteration walks the part below t2
    t_start: float = 0.5            # t2 / T at the first iteration, annealed linearly ...
    t_end: float = 0.18             # ... to this at the last
    t1_ratio: float = 0.6           # hybrid forward process: noise to t1 = ratio·t2, DDIM-invert to t2
    eta: float = 0.0                # DDIM noise
    sampler: str = "ddim"           # "ddim", or "lcm" for latent-consistency models (fresh noise each step)
    guidance: float = 7.5           # classifier-free guidance scale
    recon_steps: int = 15           # N texture updates per iteration, target frozen
    # Generation only: each of a pass's updates fits K views drawn from the targets of this many
    # latest passes (1: the paper's, the pass's own K). Frozen cameras overfit the Gaussians to K
    # views; drawing from more costs no denoising (a mesh texture's K views already cover it).
    replay: int = 1
    init_recon_steps: int = 40      # texture updates after the initial pass from pure noise
    # Views in that pass (0: all K). One view anchors a single mode of a multimodal prompt that
    # later, partially noised passes follow; with K views each picks its own and they blend
    # (bench, multimodal crate, 3 seeds: worst 29.9 dB with 1 view against 17.1 dB with 4).
    init_views: int = 1
    lr: float = 0.05                # Adam on the texture pyramid's logits
    loss: str = "l2"                # "l2" or "l1" in pixel space
    # Weight pixels by |cos(normal, view ray)|^this (0: off). Measured (bench, 3 meshes, 2 seeds):
    # 1.0 gives +0.16 / +0.13 / -0.06 dB on crate / vase / table against 0; small here because the
    # exact prior's views agree, larger where a prior blurs grazing views.
    normal_weighting: float = 1.0
    background: float = 1.0         # grey level behind the mesh in the views the prior sees
    pad_texels: int = 8             # UV-island padding of the final texture
    stream_every: int = 5           # send a texture update every this many texture updates
    # Measured (bench/retrieval.py, crate): SIR's own first pass already beats a similar asset's
    # views (30.7 against 20.8 dB), so the warm-up is light: -0.1 dB with a similar or unrelated one.
    warmup: WarmUp = WarmUp(weight=1.0, fraction=0.3)
    adapt: Adaptation = Adaptation()

    def total_work(self, refine: bool = False) -> int:
        """Progress units: one per texture update, so the bar moves evenly. Refining an existing
        texture skips the pass that samples views from pure noise."""
        return (0 if refine else self.init_recon_steps) + self.iterations * self.recon_steps


@dataclass(frozen=True)
class DistillConfig:
    """SDS and SSD: one noisy render per view per step, no denoising chain; thousands of NFEs."""

    estimator: str = "sds"          # "sds" or "ssd"
    views: int = 4                  # views per step, azimuths evenly spaced from a random offset
    elevations: tuple[float, ...] = ELEVATIONS
    elevation_jitter: float = 0.0   # each view's elevation moves by up to this many degrees
    iterations: int = 500           # optimisation steps (each costs one CFG pair per view)
    t_min: float = 0.02             # t ~ U[t_min, t_max]·T ...
    t_max: float = 0.98
    anneal: bool = False            # ... or annealed linearly from t_max to t_min
    guidance: float = 100.0         # SDS needs a large CFG scale; SSD works at 7.5
    weighting: str = "sds"          # w(t): "sds" (1 − ᾱ), "uniform", "snr_sqrt"
    tau: int = 200                  # SSD's switch between its two branches
    lr: float = 0.02                # Adam on the texture pyramid's logits
    background: float = 1.0
    pad_texels: int = 8
    stream_every: int = 10
    # Measured (bench/retrieval.py, crate, 80 images): a similar asset lifts SDS from 20.6 to 22.5 dB
    # at weight 10 over 60 % (24.0 at weight 100, where an unrelated one costs 1.3 dB instead of 0.6).
    warmup: WarmUp = WarmUp(weight=10.0, fraction=0.6)
    adapt: Adaptation = Adaptation()
    delta: DeltaDenoising = DeltaDenoising()

    def total_work(self, refine: bool = False) -> int:
        return self.iterations


METHODS = ("sir", "sds", "ssd")

PRESETS: dict[str, dict[str, SIRConfig | DistillConfig]] = {
    "sir": {
        # MicroDreamer's mesh-texture refinement settings scaled to texturing from blank: 8 views,
        # 10-step DDIM, annealed t2, hybrid forward process, 15 updates per iteration. Views render
        # at the prior's own resolution.
        "quality": SIRConfig(),
        # For the built-in tiny model on a CPU: the same algorithm at toy sizes, in seconds.
        "pipeline-check": SIRConfig(views=4, iterations=6, recon_steps=10, init_recon_steps=20, stream_every=5,
                                    adapt=_TINY_ADAPTATION),
        # Few-step distilled models (SD-Turbo and the like): 4 DDIM steps on a trailing grid, no CFG
        # (one UNet branch per step), fewer updates.
        "turbo": SIRConfig(ddim_steps=4, guidance=1.0, iterations=6, recon_steps=12, init_recon_steps=30),
        # Latent-consistency models (an LCM checkpoint, or SD with an LCM-LoRA): the turbo schedule
        # sampled the way LCMs are distilled to be, re-noising each clean estimate afresh. Their
        # guidance is embedded in the model (or absent with an LCM-LoRA), so no CFG pair.
        "lcm": SIRConfig(ddim_steps=4, guidance=1.0, sampler="lcm", iterations=6, recon_steps=12,
                         init_recon_steps=30),
        # MicroDreamer's short refinement of an existing texture: noise only (no inversion) to
        # t ≈ 0.36·T·strength — 180 at the default strength 0.5 — 10 DDIM steps at η 0, 3×15 updates.
        "refine": SIRConfig(iterations=3, t_start=0.36, t_end=0.36, t1_ratio=1.0, recon_steps=15, lr=0.05),
    },
    "sds": {
        "quality": DistillConfig(estimator="sds", guidance=100.0, iterations=1000),
        "pipeline-check": DistillConfig(estimator="sds", guidance=100.0, iterations=20, views=2, stream_every=5,
                                        adapt=_TINY_ADAPTATION),
    },
    "ssd": {
        # τ stays at the paper's 200 (chosen there with SD 2.1). The exact prior cannot rank τ for a
        # real model: `bench/quality.py --ssd-sweep` scores τ 1000 highest on it (32.32 dB, 35.44 with
        # w(t) uniform, against 14.96 at 200; multimodal crate, 2026-12-04) only because its posteriors
        # mix above t ≈ 850 alone, so the large-t trap τ guards against hardly acts, and its h
        # vanishes near a mode.
        "quality": DistillConfig(estimator="ssd", guidance=7.5, iterations=1000),
        "pipeline-check": DistillConfig(estimator="ssd", guidance=7.5, iterations=20, views=2, stream_every=5,
                                        adapt=_TINY_ADAPTATION),
    },
}


@dataclass(frozen=True)
class SplatConfig:
    """The 3D Gaussians of a generated object. The object lives in the unit ball at the origin
    (Z up), which every camera frames. Learning rates are DreamGaussian's per parameter (the
    schedule's ``lr`` is a texture's and plays no part here)."""

    # Gaussians at the start, in a ball of ``radius``. Not adopted: 16,384 for SIR (4x as many, each
    # 0.63x as wide), to give the tabletop thinner Gaussians. Seed 0, Gaussian PSNR / point-to-surface
    # Chamfer / normal consistency, 4,096 -> 16,384: table 24.95 / 0.0065 / 0.881 -> 24.99 / 0.0061 /
    # 0.872 (SDS 0.0057), vase 27.07 / 0.0074 / 0.955 -> 27.30 / 0.0090 / 0.940, at 2.3-3x the CPU time.
    count: int = 4096
    radius: float = 0.5
    lr_means: float = 1e-3
    lr_scales: float = 5e-3
    lr_quats: float = 5e-3
    lr_opacities: float = 5e-2
    lr_colors: float = 1e-2
    # Densify and prune (gsplat's DefaultStrategy) every this many updates until ``densify_until``:
    # MicroDreamer's "every 50 updates during the initial 200".
    densify_every: int = 50
    densify_until: int = 200
    # 3DGS's threshold on the mean screen-space gradient (NDC units). SIR's pixel loss rarely
    # reaches it; lower thresholds grow more Gaussians but help one scene and hurt another (SIR,
    # 4 views × 10 steps, Chamfer at 2e-4 -> 2e-5: table 0.0142 -> 0.0105, crate 0.0122 -> 0.0118
    # with normal consistency 0.928 -> 0.875, vase 0.0139 -> 0.0176).
    grow_grad2d: float = 2e-4
    # AbsGS: densify on each Gaussian's screen-space gradient summed with every pixel's part in
    # absolute value, so a wide Gaussian over pixels that pull it different ways (which cancel in
    # the plain gradient) still splits. SIR's presets use it. SIR, 13 passes, one run each, Chamfer /
    # normal consistency / held-out PSNR, plain -> absolute at 2e-4: table 0.0121 / 0.853 / 25.15 ->
    # 0.0103 / 0.853 / 25.18, crate 0.0110 / 0.921 / 26.55 -> 0.0106 / 0.913 / 26.64, vase
    # 0.0130 / 0.940 / 26.83 -> 0.0130 / 0.929 / 26.96 (table at 1e-4: 0.0101 / 0.848 / 25.33; with
    # the shipped mesh extraction, 0.0098 / 0.879 / 25.19 at 2e-4 -> 0.0096 / 0.873 / 25.24 at 1e-4).
    # SDS's runs were not repeated with it.
    absgrad: bool = False
    max_count: int = 100_000        # stop growing past this, so memory stays bounded
    # Not done: 3DGS's opacity reset (every opacity to 0.01 at update 100 of SIR's 650, then regrown;
    # done by hand, as gsplat 1.5.3's DefaultStrategy tests ``step % reset_every == 0 & step > 0``, which is
    # never true). Seed 0, PSNR / point-to-surface Chamfer / normal consistency: vase 27.07 / 0.0074 / 0.955
    # -> 27.04 / 0.0056 / 0.967, table 24.95 / 0.0065 / 0.881 -> 24.88 / 0.0092 / 0.895 (SDS 0.0057).
    # Not done: a loss on each Gaussian's smallest scale (surfel-style flattening, weight 1 on its mean
    # in world units), tried because SIR's tabletop Gaussians are twice SDS's thickness and its mesh
    # stands off that face. It thinned them (median smallest scale 0.0043 -> 0.0009) but moved Chamfer
    # little and lost normal consistency. SIR, shipped preset, one run each, PSNR / Chamfer / normal
    # consistency: table 25.19 / 0.0098 / 0.879 -> 25.13 / 0.0095 / 0.873, crate 26.67 / 0.0105 /
    # 0.928 -> 26.73 / 0.0101 / 0.909, vase 26.92 / 0.0121 / 0.948 -> 27.07 / 0.0130 / 0.928.
    # Not done: DreamGaussian's log-linear decay of the centres' rate, 1e-3 -> 2e-5 over the schedule's
    # updates. Table, seed 0, PSNR / Chamfer / normal consistency: SIR 24.96 / 0.0094 / 0.880 -> 24.81 /
    # 0.0095 / 0.885; SDS 24.16 / 0.0088 / 0.865 -> 22.60 / 0.0162 / 0.809 (its 500 noisy updates still
    # move the surface late).
    # Not done: densifying SIR's Gaussians until update 450 of its 700 instead of 200 (DreamGaussian
    # densifies throughout). More of them draw the object (table, seed 2: 1,396 -> 3,622 seen), but the
    # meshes barely move and lose normal consistency. Shipped SIR preset, PSNR / Chamfer / normal
    # consistency: table seed 2 24.97 / 0.0096 / 0.876 -> 25.18 / 0.0093 / 0.860 (SDS 24.64 / 0.0089),
    # table seed 0 24.96 / 0.0094 / 0.880 -> 25.13 / 0.0092 / 0.864 (SDS 24.16 / 0.0088),
    # crate seed 0 26.64 / 0.0099 / 0.936 -> 26.77 / 0.0099 / 0.918, vase seed 0 27.08 / 0.0115 / 0.956 ->
    # 27.14 / 0.0123 / 0.937.
    # Not done: moving faded Gaussians onto visible ones after densifying (3DGS-MCMC's relocation,
    # every 50 updates to update 450). On SIR's table (10 passes), where 2,700 of 3,800 fade, it raised
    # held-out PSNR 24.99 -> 25.27 dB but worsened Chamfer 0.0125 -> 0.0136 (opacity < 0.02; < 0.005:
    # 0.0144).
    # Not done: halving SIR's visible flat discs (largest scale over 0.015 and 3 times their smallest) along
    # their longest axis every 50 updates to update 600, other axes kept, meant to stop wide discs tilted off
    # the tabletop from standing out of it. Shipped mesh extraction, Gaussian PSNR / point-to-surface Chamfer /
    # normal consistency, shipped -> split: table seed 0 24.95 / 0.0061 / 0.908 -> 25.07 / 0.0059 / 0.896,
    # seed 1 25.22 / 0.0063 / 0.906 -> 25.37 / 0.0058 / 0.896, seed 2 24.97 / 0.0066 / 0.904 -> 25.13 / 0.0061 /
    # 0.895, seed 3 25.19 / 0.0067 / 0.906 -> 25.37 / 0.0061 / 0.896, seed 4 24.83 / 0.0071 / 0.904 -> 24.99 /
    # 0.0064 / 0.894 (mean 0.0066 -> 0.0061; SDS 0.0063); but the vase, whose Gaussians split too (4,096 ->
    # 19,344), 27.07 / 0.0073 / 0.964 -> 27.24 / 0.0092 / 0.946: thinner Gaussians move its surface inward
    # (offset -0.0052 -> -0.0073), as every narrowing tried has. Discs 5 times their thickness only: table
    # seed 2 25.13 / 0.0063 / 0.896, vase 27.26 / 0.0085 / 0.952 (10,937 Gaussians).


@dataclass(frozen=True)
class MeshConfig:
    """Gaussians → textured mesh: DreamGaussian's extraction, then SIR's texture refinement."""

    # Density grid per axis over the unit cube [-1, 1]³. Not adopted: 192 (meshing's filter and fill margin,
    # in cells, shrink with it). Chamfer / normal consistency at 128 -> 192, seed 0 (table seed 2): SIR table
    # 0.0094 / 0.880 -> 0.0089 / 0.856 (0.0096 -> 0.0086), SDS table 0.0088 / 0.866 -> 0.0092 / 0.834 (0.0089 ->
    # 0.0090), SIR vase 0.0116 / 0.956 -> 0.0144 / 0.955, SDS vase 0.0174 -> 0.0223.
    grid: int = 128
    # Marching-cubes level. DreamGaussian's 1.0 puts the surface inside the one the renders show:
    # the renders' silhouette is where alpha, composited through every Gaussian along a grazing ray,
    # reaches ½, which is far out in each Gaussian's tail. A ball's skin of Gaussians (σ 0.02,
    # opacity 0.8) renders a silhouette of radius 0.553; the mesh's is 0.549 at 0.1, 0.520 at 1.0
    # (Gaussians widened to half a cell as ``density_filter`` does; without it 0.05 gave 0.551).
    # Chamfer / normal consistency on bench/generate.py's Gaussians (exact prior, 3,000 at the
    # start, grid 128), no filter at 0.05 -> half-cell filter at 0.1: SIR table 0.0110 / 0.855 ->
    # 0.0103 / 0.880, crate 0.0108 / 0.918 -> 0.0106 / 0.934, vase 0.0128 / 0.935 -> 0.0121 / 0.953;
    # SDS table 0.0091 / 0.855 -> 0.0089 / 0.872, crate 0.0113 / 0.880 -> 0.0109 / 0.898, vase
    # 0.0201 / 0.850 -> 0.0190 / 0.867. With the filter, 0.05 / 0.07 / 0.15: SIR table 0.0126 /
    # 0.0112 / 0.0095, crate 0.0124 / 0.0113 / 0.0102, vase 0.0119 / 0.0118 / 0.0127.
    # Again on both methods' shipped Gaussians (seed 0; table seed 2 in brackets), Chamfer at 0.05 / 0.1 /
    # 0.2 / 0.3: SIR table 0.0109 / 0.0094 / 0.0088 / 0.0087 (0.0117 / 0.0096 / 0.0086 / 0.0085), SDS table
    # 0.0091 / 0.0088 / 0.0090 / 0.0093 (0.0094 / 0.0089 / 0.0090 / 0.0093), SIR vase 0.0104 / 0.0116 /
    # 0.0135 / 0.0146, SDS vase 0.0158 / 0.0174 / 0.0189 / 0.0196. Thin parts want a higher level and
    # round ones a lower, so no one level serves both; nor does the level whose mesh silhouettes best
    # match the Gaussians' (alpha > ½, 24 views over the sphere): that is the lowest tried on every object.
    density_threshold: float = 0.1
    # Every Gaussian is at least this many grid cells wide (σ² + s² per axis, opacity kept) when the
    # grid samples it. Optimised Gaussians are often far thinner than a cell (SIR's table legs are
    # beads of flat discs 0.002 thick, against cells of 0.016), and the grid's samples fall between
    # them: the renders, whose low-pass filter widens every Gaussian to about a pixel, show a solid
    # leg, and the mesh a broken one. A sheet of such discs midway between two layers of cell centres
    # samples to a peak of 0.003 where on a layer it has 5.5, and vanishes; widened, 4.0 against 6.4.
    # Like the level, it trades thin parts against round ones. Chamfer on the generation bench's Gaussians
    # (seed 0; table seed 2 in brackets) at 0.3 / 0.5 / 0.8 cells: SIR table 0.0091 / 0.0094 / 0.0140
    # (0.0089 / 0.0096 / 0.0147), SDS table 0.0091 / 0.0088 / 0.0115 (0.0091 / 0.0089 / 0.0122), SIR vase
    # 0.0131 / 0.0116 / 0.0105, SDS vase 0.0188 / 0.0174 / 0.0130.
    density_filter: float = 0.5
    # Each Gaussian is also widened by this many times its own smallest scale (in quadrature, every axis):
    # more for big round Gaussians, whose object's surface lies further out past their centres, than for
    # the thin discs that lie flat on a thin part (``_SIR_MESH`` has the figures). Not yet for SDS and SSD: at
    # 1.0 SDS's Chamfer moves vase seeds 0 / 1 0.0144 / 0.0128 -> 0.0117 / 0.0112, crate seed 1 0.0066 -> 0.0063,
    # table seeds 0 / 1 0.0057 / 0.0086 -> 0.0061 / 0.0079; its table's other seeds were not measured.
    thickness_filter: float = 0.0
    # The cell filter along each Gaussian's smallest axis, if not ``density_filter``: a flat disc's normal,
    # along which the whole-cell filter thickens a thin part (``_SIR_MESH`` has the figures).
    normal_filter: float | None = None
    # Taubin smoothing passes over the marching-cubes mesh (λ 0.5, μ -0.53: no shrinking), before decimation.
    # It takes out the grid's and the Gaussians' ripples, which the texture bake pays for (``_SIR_MESH``). Not
    # yet for SDS and SSD: at 10 passes, SDS seed 0, Chamfer / normal consistency / textured-mesh PSNR, table
    # 0.0057 / 0.868 / 23.48 -> 0.0056 / 0.902 / 23.50, vase 0.0144 / 0.890 / 24.51 -> 0.0147 / 0.921 / 24.38.
    smooth_iterations: int = 0
    fill_views: int = 32            # cameras over the sphere that decide the solid inside (0: no fill)
    face_budget: int = 50_000       # decimate to at most this many triangles
    # Floaters: parts with fewer faces than ``min_component`` of the largest part's are dropped,
    # unless they are thin and long (``thin_ratio`` times longer than thick, and reaching
    # ``min_span`` of the largest part's longest side). A table's legs come out as separate parts
    # of 1-3 % of the top's faces, 0.28-0.47 of its length and 7-10 times longer than thick; the
    # benchmark's floaters reach 0.11 of the length and 2.6 times. Chamfer on its table after
    # SIR: 0.0202 by faces alone, 0.0142 with thin parts kept; SDS 0.0144 -> 0.0092.
    min_component: float = 0.05
    min_span: float = 0.2
    thin_ratio: float = 3.0
    texture_size: int = 1024
    bake_views: int = 8             # views per bake round, rendered from the Gaussians
    bake_rounds: int = 4
    bake_steps: int = 25            # texture updates per bake round
    refine_preset: str = "refine"   # SIR preset for the final texture refinement ("" skips it)
    refine_strength: float = 0.5


@dataclass(frozen=True)
class GenerateConfig:
    method: str
    schedule: SIRConfig | DistillConfig
    splats: SplatConfig = SplatConfig()
    mesh: MeshConfig = MeshConfig()

    def total_work(self) -> int:
        """Progress units: Gaussian updates, then bake updates, then the refinement's."""
        refine = PRESETS["sir"][self.mesh.refine_preset].total_work(True) if self.mesh.refine_preset else 0
        return self.schedule.total_work() + self.mesh.bake_rounds * self.mesh.bake_steps + refine


_TINY_SPLATS = SplatConfig(count=1500, densify_every=10, densify_until=30)
_TINY_MESH = MeshConfig(grid=48, face_budget=4000, texture_size=512, bake_views=4, bake_rounds=2, bake_steps=10,
                        density_threshold=0.5, fill_views=16)

# MicroDreamer on 3DGS with a text-to-image prior: K = 4 views, 10-step DDIM, t2 annealed 0.8T →
# 0.3T; the first pass from pure noise uses all K views, since one view says nothing about the
# shape behind it. Each update fits K views drawn from the latest 8 passes' targets (replay).
# Measured (bench/generate.py's crate, exact prior, 3,000 Gaussians, one run each; held-out PSNR at
# the end / images denoised): the paper's 30 iterations × 15 updates 25.94 dB / 1,664 (frozen views
# instead of replay: 24.74 dB); 20 × 30 26.15 / 1,136; 15 × 30 26.08 / 876; 12 × 45 25.83 / 712;
# 10 × 40 25.87 / 612; 10 × 50 26.07 / 612. Updates are cheap next to denoising, and with replay
# they keep paying: fewer, longer passes reach the same PSNR with 2.7x fewer images.
# Then K = 8 views at 5 DDIM steps for the same images (624 vs 612): more cameras shape the object
# better. Held-out PSNR / Chamfer of the extracted mesh (one run each, 4,096 Gaussians), K = 4 × 10
# steps → 8 × 5: crate 26.14 → 26.39 dB / 0.0122 → 0.0117, vase 26.34 → 26.70 / 0.0139 → 0.0132,
# table 24.54 → 24.99 / 0.0142 → 0.0125.
# Then 13 passes instead of 10: 800 images, exactly one fifth of SDS's 4,000 (the target's budget).
# PSNR / Chamfer 10 → 13 passes: crate 26.39 → 26.55 / 0.0117 → 0.0110, vase 26.70 → 26.83 /
# 0.0132 → 0.0130, table 24.99 → 25.15 / 0.0125 → 0.0121 (SDS: 25.89 / 0.0113, 25.99 / 0.0207,
# 24.49 / 0.0092).
# Not adopted: an L1 loss (3DGS's; its larger gradients reach the densify threshold more often). Table,
# 13 passes: PSNR 25.15 → 24.49 dB, Chamfer 0.0121 → 0.0217, 3,838 → 2,380 Gaussians.
# Not adopted: 75 updates per pass instead of 50 (free in images denoised). Table, shipped splats and
# mesh: PSNR 25.19 → 25.04 dB, Chamfer 0.0098 → 0.0096, within one run's noise for 50 % more updates.
# Not adopted: more cameras per pass at fewer DDIM steps for about the same images. Table, PSNR /
# Chamfer: 8 views × 5 steps × 13 passes (800 images) 25.19 dB / 0.0098; 10 × 4 × 13 (770) 25.16 /
# 0.0098; 16 × 4 × 8 (768) 24.96 / 0.0107.
# Then elevations jittered by up to 20° (DreamGaussian and MicroDreamer draw each camera's height at
# random): the cycle's four heights alone left the passes' 104 cameras on four cones. PSNR / Chamfer /
# normal consistency, seed 0, fixed heights → 20°: table 25.19 / 0.0098 / 0.879 → 24.96 / 0.0094 /
# 0.880, crate 26.67 / 0.0105 / 0.928 → 26.64 / 0.0099 / 0.936, vase 26.92 / 0.0121 / 0.948 → 27.08 /
# 0.0115 / 0.956 (table at 10°: 24.96 / 0.0096 / 0.885, at 30°: 24.89 / 0.0110 / 0.861). Seed 1, table:
# SIR 25.22 / 0.0094 / 0.883 against SDS's 23.92 / 0.0116 / 0.844 (seed 0: 24.16 / 0.0088 / 0.865); seed 2,
# table: SIR 24.97 / 0.0096 / 0.876, SDS 24.64 / 0.0089 / 0.857. Seed 1, SIR against SDS: crate 26.89 /
# 0.0099 / 0.936 vs 26.35 / 0.0110 / 0.907, vase 27.29 / 0.0121 / 0.955 vs 26.84 / 0.0160 / 0.904.
# Not adopted: cameras at the horizon, elevations (0, 30, -30, 60, -55) cycled instead of ELEVATIONS
# (a tabletop seen edge-on shows its thickness). Seed 0 unless noted, PSNR / Chamfer / normal
# consistency, shipped → horizon: table 24.95 / 0.0094 / 0.880 → 25.22 / 0.0087 / 0.879, table seed 2
# 24.97 / 0.0096 / 0.876 → 25.16 / 0.0105 / 0.857, vase 27.08 / 0.0115 / 0.956 → 27.49 / 0.0122 / 0.952,
# crate 26.64 / 0.0099 / 0.936 → 26.93 / 0.0099 / 0.933: renders gain, meshes do not.
_GENERATE_SIR = SIRConfig(views=8, elevation_jitter=20.0, iterations=13, ddim_steps=5, t_start=0.8, t_end=0.3,
                          recon_steps=50, init_recon_steps=50, init_views=0, replay=8)

_SIR_SPLATS = SplatConfig(absgrad=True)
# SIR's Gaussians are fewer and wider than SDS's (on the table's top 289 of median largest scale 0.023 against 1,919 of
# 0.0065), so their density's tails reach further and the default extraction stands its thin tabletop 0.006 out of both
# faces. First, widened by a whole cell and cut at a level five times higher, the surface kept nearer the Gaussians' own
# extent (a ball's skin of σ 0.02 Gaussians meshes at radius 0.542, its renders' silhouette at 0.553, the default at
# 0.549) and nearer the shape on every bench object. Seed 0 unless noted, point-to-surface Chamfer / normal consistency,
# default (0.5 cell, level 0.1) -> 1 cell at 0.5: table 0.0065 / 0.881 -> 0.0061 / 0.908 (seed 1: 0.0064 / 0.886 ->
# 0.0063 / 0.906; seed 2: 0.0067 / 0.878 -> 0.0066 / 0.904; seed 3: 0.0071 / 0.884 -> 0.0067 / 0.906; seed 4: 0.0073 /
# 0.879 -> 0.0071 / 0.904), crate 0.0051 / 0.935 -> 0.0048 / 0.949, vase 0.0074 / 0.955 -> 0.0073 / 0.964. Level 0.55 /
# 0.6 favour the table (0.0058 / 0.0055) over the vase (0.0080 / 0.0085); 0.3 the vase (0.0051) over the table (0.0096);
# a 0.75-cell filter at 0.2 / 0.3: table 0.0068 / 0.0056, vase 0.0066 / 0.0085. SDS's Gaussians keep the default, their
# best on the table (1 cell at 0.3 / 0.5: table 0.0085 / 0.0068 against 0.0057, vase 0.0092 / 0.0127 against 0.0144).
# No pair of filter and level serves both the table and the vase: on the five table seeds' Gaussians, Chamfer table
# seeds 0-4 / vase / crate (seed 0), the above 0.0061 0.0063 0.0066 0.0067 0.0071 / 0.0073 / 0.0048; 0.75 cell at 0.5:
# 0.0052 0.0052 0.0051 0.0053 0.0058 / 0.0109 / 0.0063; 1 cell at 0.8: 0.0053 0.0054 0.0054 0.0055 0.0061 / 0.0102 /
# 0.0058; 1.25 cells at 0.5: 0.0119-0.0125 / 0.0051 / 0.0074. SIR's vase Gaussians are rounder than its tabletop's discs
# (median smallest scale 0.014 against 0.003), so each Gaussian is also widened by half its own smallest scale
# (``thickness_filter``): round parts' surfaces move out, flat discs stay where they were. Chamfer, the above -> this:
# table seeds 0-4 0.0061 0.0063 0.0066 0.0067 0.0071 -> 0.0063 0.0065 0.0068 0.0068 0.0073, vase seeds 0 / 1 0.0073 /
# 0.0076 -> 0.0065 / 0.0067, crate seeds 0 / 1 0.0048 / 0.0043 -> 0.0046 / 0.0044 (summed over the three, means over
# seeds: -4 %); textured-mesh PSNR (the pipeline after the Gaussians, as bench/generate.py runs it) table seed 0 24.66
# -> 24.56 dB, seed 4 24.17 -> 24.16, vase 26.67 -> 27.20, crate 26.12 -> 26.28. Larger factors on a narrower filter
# lower every object's Chamfer but roughen the table, whose textured mesh loses far more: a 0.75-cell filter with 1.1
# times the smallest scale, table seeds 0-4 0.0056 0.0055 0.0056 0.0057 0.0064, vase 0.0066 / 0.0068, crate 0.0046 /
# 0.0046, but table seed 0 normal consistency 0.908 -> 0.886 and textured-mesh PSNR 24.66 -> 22.95 dB (seed 3 23.46,
# seed 4 22.99); 0.875 cell with 0.75: table seed 0 0.0055, 23.78 dB, vase 0.0073, 26.59 dB. With a 0.75-cell filter,
# factors 1 / 1.2 / 1.25: table mean 0.0057 / 0.0059 / 0.0060, vase 0.0075 / 0.0060 / 0.0057, crate 0.0046 / 0.0049 /
# 0.0052. What thickens SIR's table is the tabletop alone (top face +0.0067 out, underside +0.0071; its legs and edges
# sit nearer than SDS's, 0.0039 against 0.0049 from the reference): the whole-cell filter along its discs' normals. So
# the filter along each Gaussian's smallest axis is three quarters of a cell (``normal_filter``), the thickness term
# 1.0, and 10 Taubin passes smooth the ripples that the narrower filter leaves. Chamfer, the above -> this: table seeds
# 0-4 0.0063 0.0065 0.0068 0.0068 0.0073 (mean 0.0067) -> 0.0054 0.0054 0.0057 0.0057 0.0064 (mean 0.0057; SDS 0.0057
# 0.0086 0.0057 0.0057 0.0058, mean 0.0063), vase seeds 0 / 1 0.0065 / 0.0067 -> 0.0067 / 0.0069, crate 0.0046 / 0.0044
# -> 0.0046 / 0.0045; table seed 0 normal consistency 0.910 -> 0.919. Textured-mesh PSNR: table seeds 0-4 24.19 24.01
# 24.02 24.34 23.78 dB (mean 24.07; SDS 23.48 23.25 23.81 23.88 23.82, mean 23.65; before, seeds 0 / 4: 24.56 / 24.16),
# vase 27.20 -> 26.76, crate 26.28 -> 26.31 (the thicker tabletop probably matched the Gaussians' blurred renders, which
# the texture is baked from). Without the smoothing: table seed 0 normal consistency 0.896, 23.95 dB; smoothing alone:
# table seed 0 0.0063, 24.87 dB. Filter 0.5 cell along the normal: table seed 0 0.0052 but normal consistency 0.872,
# vase 0.0114; 0.875 with the thickness term 1.0: table seed 0 0.0061, vase 0.0054, crate 0.0048; 0.75 with 1.1: table
# mean 0.0059, vase 0.0059 / 0.0061, crate 0.0047 / 0.0049. Not done: halving the visible flat discs along their longest
# axis during optimisation (``SplatConfig`` has it), with the whole-cell filter: table seed 0 0.0060 (thickness term
# 0.5) / 0.0064 (1.0), vase 0.0086 / 0.0063, at twice the vase's time (18,728 Gaussians).
_SIR_MESH = MeshConfig(density_threshold=0.5, density_filter=1.0, normal_filter=0.75, thickness_filter=1.0,
                       smooth_iterations=10)

GENERATE_PRESETS: dict[str, dict[str, GenerateConfig]] = {
    "sir": {
        "quality": GenerateConfig("sir", _GENERATE_SIR, _SIR_SPLATS, _SIR_MESH),
        "pipeline-check": GenerateConfig("sir", SIRConfig(views=2, iterations=3, ddim_steps=4, t_start=0.8,
                                                          t_end=0.4, recon_steps=5, init_recon_steps=10,
                                                          init_views=0, stream_every=5, adapt=_TINY_ADAPTATION),
                                         _TINY_SPLATS, _TINY_MESH),
        # Few-step models: their texturing schedule's denoising (4 steps, guidance-free, LCM sampling
        # for LCMs) with generation's annealing, first pass and iterations, and 4 views: their steps
        # are already few, so 8 views would double their images.
        **{name: GenerateConfig("sir", replace(_GENERATE_SIR, views=4, ddim_steps=PRESETS["sir"][name].ddim_steps,
                                               guidance=PRESETS["sir"][name].guidance,
                                               sampler=PRESETS["sir"][name].sampler), _SIR_SPLATS, _SIR_MESH)
           for name in ("turbo", "lcm")},
    },
    "sds": {
        # Elevations jittered by up to 20°, as SIR's: PSNR / Chamfer / normal consistency, seed 0, fixed
        # heights → 20°: table 24.45 / 0.0092 / 0.864 → 24.16 / 0.0088 / 0.865, crate 25.86 / 0.0109 /
        # 0.896 → 26.32 / 0.0109 / 0.900, vase (Chamfer 0.0190 / 0.867 fixed) → 26.54 / 0.0174 / 0.890.
        # SSD's preset was not measured with it.
        "quality": GenerateConfig("sds", DistillConfig(estimator="sds", guidance=100.0, iterations=500,
                                                       elevation_jitter=20.0)),
        "pipeline-check": GenerateConfig("sds", DistillConfig(estimator="sds", iterations=20, views=2,
                                                              stream_every=5, adapt=_TINY_ADAPTATION),
                                         _TINY_SPLATS, _TINY_MESH),
    },
    "ssd": {
        "quality": GenerateConfig("ssd", DistillConfig(estimator="ssd", guidance=7.5, iterations=500)),
        "pipeline-check": GenerateConfig("ssd", DistillConfig(estimator="ssd", guidance=7.5, iterations=20, views=2,
                                                              stream_every=5, adapt=_TINY_ADAPTATION),
                                         _TINY_SPLATS, _TINY_MESH),
    },
}


def resolve_generate(method: str, preset: str, overrides: dict[str, Any]) -> GenerateConfig:
    """A generation preset with its schedule's fields overridden (``iterations``, ``guidance``)."""
    if method not in GENERATE_PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if preset not in GENERATE_PRESETS[method]:
        raise ValueError(f"unknown preset {preset!r} for generating with {method}; "
                         f"choose one of {sorted(GENERATE_PRESETS[method])}")
    base = GENERATE_PRESETS[method][preset]
    return replace(base, schedule=_override(base.schedule, method, overrides))


def default_preset(method: str, model: str, refine: bool = False, few_step: str | None = None,
                   table: dict[str, dict[str, Any]] = PRESETS) -> str:
    """The tiny model gets toy sizes; refining with SIR gets MicroDreamer's short refinement; a
    few-step model (``few_step``: 'lcm' or 'turbo') gets its own schedule where the method has one."""
    if model == "tiny":
        return "pipeline-check"
    if refine and "refine" in table[method]:
        return "refine"
    return few_step if few_step in table[method] else "quality"


def resolve(method: str, preset: str, overrides: dict[str, Any]) -> SIRConfig | DistillConfig:
    """A method's preset with overrides applied; unknown names fail loudly rather than being ignored."""
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if preset not in PRESETS[method]:
        raise ValueError(f"unknown preset {preset!r} for {method}; choose one of {sorted(PRESETS[method])}")
    return _override(PRESETS[method][preset], method, overrides)


def _override(base: SIRConfig | DistillConfig, method: str, overrides: dict[str, Any]) -> SIRConfig | DistillConfig:
    known = {f.name for f in fields(base)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown {method} setting(s) {sorted(unknown)}; known: {sorted(known)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
