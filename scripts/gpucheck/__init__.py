"""The stages of ``scripts/gpu_check.py`` (issue 13), one module each, plus what they share.

``common`` (plan, rows, timing, feature detection) · ``models`` (weights, model pairs, inputs, conv shapes) ·
``correctness`` (stage 1) · ``kernel_bench`` (stage 2) · ``whole_model`` (stage 3) · ``environment`` ·
``report`` (``gpucheck.md``).

Time estimates on an H100/H200 (16 host cores), and how they were reached
--------------------------------------------------------------------------
Not measured on a GPU yet (this project has had none); built from counts, the published rates, and what
was measured on this project's CPU. The limits are the estimates with a margin, and every stage stops
starting work at its limit, so the worst case is the sum of the limits and kill graces, 425 s, plus
setup (~15 s, and a 30 s pip attempt where nothing is installed): under 8 minutes.

* **Setup, ~15 s** (the limits leave it 55 s of the 8 minutes): four Python start-ups importing torch and
  torchvision (2–4 s each on a free machine: 8 s measured here on 2 loaded cores), ``nvidia-smi``, the
  bench suite's weights (one train-mode pass of ResNet-50 over six 129² photographs on the CPU, ~2 s).
* **Correctness, ~70 s (limit 95 s).** Dominated by Triton compilation, not arithmetic. One sm_90 build
  of the conv kernel took 0.6 s of CPU here (``python -m fastdeeplab.kernels.aot --arch 90 --kernel conv3x3
  --dtype fp16 --workers 1`` with an empty ``TRITON_CACHE_DIR``: 11 configs in 13.4 s, ~5 s of it start-up,
  on 2 loaded cores); take 0.5 s on the GPU host. 8 conv, 4 projection and 3 grouped-branch cases × 3
  dtypes, each on one config, are ≤ 45 builds (~25 s). The two fp32 whole-model checks autotune every conv
  variant (stem 7×7, 1×1, 3×3, strided, residual or not) over its pruned configs: ~40 more builds (~20 s)
  and ~30 new problems per stride × ~4 configs × ~0.13 s of ``do_bench`` (~30 s for both strides). The
  float64 references and the small forwards are milliseconds.
* **Kernels, ~115 s (limit 115 s: the tail is cut).** 48 distinct conv problems at 513² (both strides,
  the grouped ASPP launch included; 36 of them ASPP, projection, layer3/4 and head) × batch {1, 8} ×
  {fp16, bf16} = 192 cases, fp16 first. Each case: Triton's first call (autotune, ~4 pruned configs ×
  ~0.13 s of ``do_bench`` per new problem, batch bucket and dtype), then two ``time_cuda`` of 5 + 25 ms
  (~0.06 s each with the L2 flushes), plus builds not already in Triton's on-disk cache (~20 s for the new
  variants). ~0.7 s a case: all fp16 cases and most bf16 ones fit; the rest (stem, layer1/2 in bf16) are
  recorded as skipped.
* **Whole model, ~170 s (limit 200 s).** Per output stride: building the models (~3 s); the Triton model's
  first calls (autotuning the 513² problems stage 2 did not reach, and the dispatcher timing each layer
  against cuDNN once per shape: ~30 problems × ~0.3 s ≈ 10 s per batch size), the CUDA-graph wrapper's
  three warm-up calls and capture (~1 s); ``torch.compile`` (inductor, default mode) of ResNet-50 at batch 8
  only: ~35 s on the project's 2-core CPU for the CPU graph (``bench/_impls.py``), estimated 40–60 s for
  CUDA with 16 compile workers; timing, 15 interleaved rounds of 6 rows: batch 8 at OS8 is ~2.2 TFLOP per
  call, ~10–40 ms in fp16, ~100 ms in fp32 without TF32, so ~3 s per setting. Sum: 2 × (3 + 20 + 1 + 50)
  + 4 × 3 ≈ 160 s. A compile starts only while 60 s remain, else it is recorded as skipped.

The dry run (``--dry-run``) replaces the sizes: a tiny DeepLabv3 (``models.py``), 17–35 pixel inputs,
batch 1, bf16 (the CPU has no fp16 convolutions for ``optimize(backend="torch")``), one timing round and no
separate first call, ``torch.compile(backend="eager")``. It takes 1–1.5 minutes on 2 loaded CPU cores:
four Python start-ups and the Triton interpreter.
"""
