"""pytest plumbing of the benchmark suite: options, the shared session state, and the outputs.

``pytest bench/ [--quick] [--resolution 513] [--impl onnxruntime,openvino] ...`` (or ``fastdeeplab bench``);
the options are declared once, in :data:`fastdeeplab.bench_cli.OPTIONS`. At the end of the session the
summary table is printed and ``bench/results/latest.json`` (+ a timestamped copy) and
``bench/results/latest.png`` are written.
"""

from __future__ import annotations

import os
import sys

# OpenMP threads that wait by sleeping instead of spinning. On a busy machine (more runnable threads than
# cores) spinning PyTorch/oneDNN threads steal the cores they wait for and eager latency triples or worse;
# on an idle one the difference is within noise for convolutions this large. libgomp reads the variable
# when it loads, so it must be set before torch is imported: `pytest bench/` imports this file first, and
# `fastdeeplab bench` runs pytest in a fresh process. An OMP_WAIT_POLICY already in the environment wins.
TORCH_PRELOADED = "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402
import datetime as _dt  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fastdeeplab.bench_cli import OPTIONS  # noqa: E402

from ._report import (  # noqa: E402
    add_kernel_speedups,
    add_speedups,
    format_kernel_table,
    format_table,
    write_json,
    write_plot,
)
from ._session import SESSION_KEY as _SESSION  # noqa: E402
from ._session import BenchConfig, BenchSession, _loadavg  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastdeeplab-bench", "fastdeeplab benchmark suite (see fastdeeplab/bench_cli.py)")
    for flag, kwargs in OPTIONS:
        group.addoption(flag, **kwargs)


_WRITTEN = pytest.StashKey[list[str]]()


def pytest_configure(config: pytest.Config) -> None:
    cfg = BenchConfig.from_pytest(config)
    workdir = Path(tempfile.mkdtemp(prefix="fastdeeplab-bench-"))
    state = BenchSession(cfg, workdir)
    state.load_at_start = _loadavg()
    state.omp_wait_policy = os.environ.get("OMP_WAIT_POLICY", "") + (
        " (set after torch loaded: no effect)" if TORCH_PRELOADED else "")
    config.stash[_SESSION] = state
    def progress(line: str) -> None:  # to the terminal even while pytest captures the tests' output
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            if reporter is None:
                print(line, file=sys.stderr, flush=True)
                return
            reporter.ensure_newline()
            reporter.write_line(line)
            reporter.flush()

    state.progress = progress
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda":  # fair to cuDNN: let it pick its fastest algorithm per shape (issue 13)
        torch.backends.cudnn.benchmark = True
    config.stash[_WRITTEN] = []
    config.pluginmanager.register(_QuietBenchmarkTable(), "fastdeeplab-quiet-benchmark-table")
    default_columns = ["min", "max", "mean", "stddev", "median", "iqr", "outliers", "ops", "rounds", "iterations"]
    if getattr(config.option, "benchmark_columns", None) == default_columns:
        config.option.benchmark_columns = ["median", "iqr", "min", "max", "rounds"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"impl", "output_stride"} <= set(metafunc.fixturenames):
        cfg = metafunc.config.stash[_SESSION].cfg
        grid = [(os_, impl) for os_ in cfg.output_strides for impl in cfg.impls]
        metafunc.parametrize("output_stride,impl", grid, ids=[f"os{o}-{i}" for o, i in grid])


def pytest_collection_finish(session: pytest.Session) -> None:
    """Remember which (output stride, implementation) tests were collected (after -k / deselection), so a
    setting builds only those."""
    state = session.config.stash.get(_SESSION, None)
    if state is None:
        return
    state.selected = {(item.callspec.params["output_stride"], item.callspec.params["impl"])
                      for item in session.items
                      if hasattr(item, "callspec") and {"output_stride", "impl"} <= set(item.callspec.params)}


@pytest.fixture(scope="session")
def bench(request: pytest.FixtureRequest) -> BenchSession:
    """The shared benchmark session (options, weights, references, ground truth, result rows)."""
    return request.config.stash[_SESSION]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # pytest-xdist worker: the controller reports
        return
    state = session.config.stash.get(_SESSION, None)
    if state is None:
        return
    shutil.rmtree(state.workdir, ignore_errors=True)
    if not state.rows and not state.kernel_rows:
        return
    add_speedups(state.rows)
    add_kernel_speedups(state.kernel_rows)
    meta = state.metadata(session.config)
    payload = {**meta, "rows": state.rows, "kernels": state.kernel_rows}
    stamp = _dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    written = session.config.stash[_WRITTEN]
    try:
        written += [str(p) for p in write_json(state.cfg.results_dir, payload, stamp)]
        plot = write_plot(state.cfg.results_dir / "latest.png", meta, state.rows)
        if plot is not None:
            written.append(str(plot))
    except OSError as exc:
        written.append(f"(could not write results: {exc})")
    state.meta = meta  # type: ignore[attr-defined]


class _QuietBenchmarkTable:
    """pytest-benchmark's own table (one row per test, ~200 columns wide) repeats the suite's samples without
    the ratios: it is left out of the terminal. Its JSON (``--benchmark-json``) is written at session finish,
    before this runs; its ``display`` prints nothing when it holds no groups."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_terminal_summary(self, config: pytest.Config) -> None:
        benchmarks = getattr(config, "_benchmarksession", None)
        if benchmarks is not None:
            benchmarks.groups = []


@pytest.hookimpl(trylast=True)  # the project's table comes last
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_SESSION, None)
    if state is None or (not state.rows and not state.kernel_rows):
        return
    meta = getattr(state, "meta", None) or state.metadata(config)
    tr = terminalreporter
    if state.rows:
        tr.write_sep("=", "fastdeeplab bench: latency and accuracy")
        for line in format_table(meta, state.rows).splitlines():
            tr.write_line(line)
    if state.kernel_rows:
        tr.write_sep("=", "fastdeeplab bench: kernels")
        for line in format_kernel_table(state.kernel_rows).splitlines():
            tr.write_line(line)
    for path in config.stash[_WRITTEN]:
        tr.write_line(f"wrote {path}")
