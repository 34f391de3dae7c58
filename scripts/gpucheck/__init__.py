"""The stages of ``scripts/gpu_check.py`` (issue 13), one module each, plus what they share.

``common`` (plan, rows, timing, feature detection) · ``models`` (weights, model pairs, inputs, conv shapes) ·
``correctness`` (stage 1) · ``kernel_bench`` (stage 2) · ``whole_model`` (stage 3) · ``environment`` ·
``report`` (``gpucheck.md``).

Time estimates on an H100/H200 (16 host cores), and how they were reached
--------------------------------------------------------------------------
Not measured on a GPU yet (this project has had none); built from counts, the published rates, and what
was measured on this project's CPU. The limits are the estimates with a margin, and every stage stops
starting work at its limit, so the worst case is the sum of the limits, 430 s + setup, under 8 minutes.

* **Setup, ~15 s** (limit: the stages' limits leave 50 s): three Python start-ups importing torch and
  torchvision (2–4 s each on a free machine: 8 s measured here on 2 loaded cores), ``nvidia-smi``, the
  bench suite's weights (one train-mode pass of ResNet-50 over six 129² photographs on the CPU, ~2 s).
* **Correctness, ~60 s (limit 100 s).** Dominated by Triton compilation, not arithmetic: 10 conv and 4 ASPP
  cases × 3 dtypes, each on one config, are ≤ 42 compiles; the two fp32 whole-model checks autotune every
  conv variant (stem 7×7, 1×1, 3×3, strided, with and without residual) over its configs, ~40–60 more.
  At 0.5–1 s per compile (a pipelined GEMM kernel for sm_90 with the ptxas that triton ships) that is
  45–100 s; the float64 references and the small model forwards are milliseconds.
* **Kernels, ~100 s (limit 120 s).** ~25 distinct conv problems (ASPP 1×1 and 3 rates at two strides, the
  projection at two strides, layer3/4 3×3 and 1×1, head, stem, layer1/2) × batch {1, 8} × {fp16, bf16} =
  ~100 cases. Each: Triton's first call (autotune: ≤ 9 configs × ~0.13 s of ``do_bench`` per new problem
  and dtype; batch is not in the key) plus two ``time_cuda`` calls of 10 + 40 ms (~0.15 s each with the
  L2 flushes and ``do_bench``'s own estimate). That is ~30 s of timing, ~50 s of autotuning, and the fp16
  and bf16 compiles the correctness stage did not already leave in Triton's on-disk cache (~20 s). The
  issue's shapes run first; whatever the limit cuts (the stem and layer1/2) is recorded as skipped.
* **Whole model, ~180 s (limit 210 s).** Per output stride: building the models (~3 s); the Triton model's
  first calls (autotuning the new 513² problems and the dispatcher timing each layer against cuDNN once per
  shape: ~30 problems × ~0.5 s ≈ 15 s per batch size); ``torch.compile`` (inductor, default mode) of
  ResNet-50: ~35 s on the project's 2-core CPU for the CPU graph (``bench/_impls.py``), estimated 40–60 s
  for CUDA with 16 compile workers, and once more for the second batch size (a recompile with a dynamic
  batch); timing, 15 interleaved rounds of 6 rows: batch 8 at OS8 is ~2.2 TFLOP per call, ~10–40 ms
  in fp16, ~100 ms in fp32 without TF32, so ~3 s per setting. Sum: 2 × (3 + 30 + 60) + 4 × 3 ≈ 200 s,
  hence compiles start only while 60 s remain, and the last compile is usually the one skipped.

The dry run (``--dry-run``) replaces the sizes: a tiny DeepLabv3 (``models.py``), 17–35 pixel inputs,
batch 1 (and 2 for the kernels), fp16 only, one timing round, ``torch.compile(backend="eager")``. It takes
~1 minute on 2 CPU cores: ~70% of it the four Python start-ups and the Triton interpreter.
"""
