"""The stages of ``scripts/gpu_check.py`` (issues 13, 19, 22), one module each, plus what they share.

``common`` (sizes, rows, timing, CUDA-error detection, the autotune setting) · ``models`` (weights, model
pairs, inputs, conv shapes, the optimized model's launches) · ``launches`` (one Triton launch described
without a GPU: arguments, autotune key, pruned configs, compile-cache key) · ``plan`` (the counts and time
estimates, ``--plan``) · ``precompile`` (stage 0) · ``correctness`` (stage 1) · ``kernel_bench`` (stage 2)
· ``whole_model`` (stage 3) · ``environment`` · ``report`` (``gpucheck.md``).

Time on an H100/H200 (16 host cores), and how it is reached
-------------------------------------------------------------
Not measured on a GPU yet (this project has had none). ``bash scripts/gpu_check.sh --plan OUTDIR`` counts,
for each stage, the autotune keys, config benchmarks and Triton builds from the stages' own case lists and
the kernels' real early prunes (sm_90 assumed), and prices them with unit costs that say where they come
from (measured on the project's CPU, configured by the check, or estimated); ``bench/RESULTS.md`` has the
table. The counts, cold (Triton's default 25 + 100 ms per config benchmark, every build inside its stage),
are what made the earlier plan unworkable: the kernel stage alone needs 186 autotune keys × 5.7 configs
≈ 1060 benchmarks (not ~4 a case) and ~270 builds. What makes the run fit instead:

* **Stage 0 builds everything first, in parallel** (439 distinct builds for the three stages, MobileNetV3's
  depthwise and SE-pooling variants included, 16 processes, 0.63–0.85 s of CPU each measured here with
  triton 3.6 / 3.8: ~49 s with start-up) into the ``TRITON_CACHE_DIR`` the stages share, with the same
  compile-cache keys the JIT computes; a stage's first launch of a build is then a cache load.
* **A short autotune benchmark**, ``FASTDEEPLAB_AUTOTUNE_MS=5,20`` (0.03 s per config instead of 0.13 s).
  Triton keeps tuning results on disk (``cache_results``), so the model stage re-tunes nothing the kernel
  stage reached.
* **Case counts chosen by the plan**: the kernel stage runs the cases, most important first, that its
  estimate fits into its limit (173 of 284 at these costs, ~79 s of 85 s: the cut falls on bf16 — ResNet's
  layers past its ASPP and MobileNetV3's batch 8) and prints that count at its start.

Estimates / limits (s), ``--plan`` on 2026-12-07: setup ~21 / 35, precompile ~49 / 60, correctness ~36 / 45,
kernels ~79 / 85, model ~228 / 235 (MobileNetV3-Large ~47 s, its 1×1 convs on the conv kernel included; two
``torch.compile`` runs of the ResNet, ~60 s each, dominate the rest); total ~412 s expected, 480 s at the
limits with a 5 s kill grace per stage. Every stage also stops starting work at its own deadline and writes every
row as it is measured, so a slow stage ends with rows rather than being killed.

The dry run (``--dry-run``) replaces the sizes: a tiny DeepLabv3 (``models.py``; MobileNetV3-Large itself,
with random weights), 17–35 pixel inputs,
batch 1, bf16 (the CPU has no fp16 convolutions for ``optimize(backend="torch")``), one timing round and no
separate first call, ``torch.compile(backend="eager")``; its stage 0 builds the dry kernel stage's few
launches (and one TMA config) for sm_90 on the CPU. A few minutes on 2 loaded CPU cores: five Python
start-ups and the Triton interpreter.
"""
