"""The AOT compile check: kernels compile for sm_90 (and sm_80) with zero spills and tensor-core instructions.

No GPU is needed: triton.compile targets GPUTarget("cuda", arch, 32) and ptxas -v reports registers and spills.
Under TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU) the compilation runs in a child process.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from fastdeeplab.kernels.aot import (  # noqa: E402
    KERNELS,
    CompileJob,
    _parse_ptxas,
    compile_reports,
    format_table,
    ptxas_path,
)

needs_ptxas = pytest.mark.skipif(ptxas_path() is None, reason="ptxas (shipped with triton's NVIDIA backend) not found")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    jobs = [CompileJob(kernel, 0, 90, "fp16") for kernel in KERNELS]
    jobs += [CompileJob("conv3x3", 0, 80, "fp16"), CompileJob("aspp_project", 0, 80, "bf16"),
             CompileJob("conv3x3", 4, 90, "fp32-tf32")]
    return compile_reports(jobs, workers=2)


@needs_ptxas
def test_each_kernel_compiles_without_spills_and_uses_tensor_cores(rows):
    assert {r["kernel"] for r in rows if r["arch"] == 90} == set(KERNELS)
    for r in rows:
        where = f"{r['kernel']} {r['config_label']} {r['dtype']} sm_{r['arch']}"
        assert r["error"] is None and r["ok"], f"{where}: {r['error']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        assert 0 < r["registers"] <= 255, where
        mma = KERNELS[r["kernel"]].mma  # False: no channel reduction (depthwise), so no MMA and maybe no smem
        assert 0 <= r["smem_bytes"] <= r["smem_limit"] and (r["smem_bytes"] > 0 or not mma), where
        assert r["tensor_cores"] == (("wgmma" if r["arch"] == 90 else "mma.sync") if mma else "none"), where


@needs_ptxas
def test_a_spilling_tile_is_reported_as_failure():
    """128x256x64 with 4 warps needs 256 accumulator registers per thread: the check must flag it."""
    big = {"BLOCK_OH": 8, "BLOCK_OW": 16, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4,
           "num_stages": 3}
    (row,) = compile_reports([CompileJob("conv3x3", -1, 90, "fp16", custom=big)], workers=1)
    assert not row["ok"]
    assert row["spill_stores"] > 0 and "spills" in row["error"]


def test_ptxas_output_parsing():
    text = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
            "ptxas info    : Function properties for _k\n"
            "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
            "ptxas info    : Used 168 registers, used 1 barriers\n")
    assert _parse_ptxas(text) == {"registers": 168, "spill_stores": 12, "spill_loads": 16, "stack_bytes": 8}


@needs_ptxas
def test_markdown_table_lists_every_row(rows):
    table = format_table(rows, markdown=True).splitlines()
    assert table[0].startswith("| kernel |") and len(table) == 2 + len(rows)
    assert all("| ok |" in line for line in table[2:])


@needs_ptxas
def test_tma_configs_load_through_tma_on_sm90():
    """The TMA configs compile to cp.async.bulk.tensor + wgmma on sm_90 (and to plain loads on sm_80)."""
    from fastdeeplab.kernels.conv import get_autotune_configs, tma_available

    if not tma_available():
        pytest.skip("this triton has no tl.make_tensor_descriptor")
    first = next(i for i, c in enumerate(get_autotune_configs(for_interpreter=False)) if c.kwargs["USE_TMA"])
    sm90, sm80 = compile_reports([CompileJob("conv3x3", first, 90, "fp16"), CompileJob("conv3x3", first, 80, "fp16")],
                                 workers=1)
    assert sm90["ok"] and sm90["tma"] and sm90["tensor_cores"] == "wgmma", sm90
    assert sm80["ok"] and not sm80["tma"], sm80
    assert "TMA" in sm90["config_label"]
