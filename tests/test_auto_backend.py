"""optimize(backend="auto") on the CPU in float32 follows what was measured per output stride."""

from __future__ import annotations


def test_auto_follows_the_measured_cpu_backend_per_output_stride(monkeypatch):
    """bench/RESULTS.md: torch is faster than OpenVINO at OS16 on CPU fp32, OpenVINO at OS8."""
    import torch

    from fastdeeplab import optimization

    cpu = torch.device("cpu")
    monkeypatch.setattr(optimization, "_importable", lambda *modules: True)
    assert optimization.resolve_backend("auto", cpu, torch.float32, output_stride=16) == "torch"
    assert optimization.resolve_backend("auto", cpu, torch.float32, output_stride=8) == "openvino"
    assert optimization.resolve_backend("auto", cpu, torch.bfloat16, output_stride=16) == "openvino"


def test_optimize_auto_at_os16_uses_the_torch_backend():
    import torch

    import fastdeeplab

    torch.manual_seed(0)
    model = fastdeeplab.deeplabv3_resnet50(num_classes=3, output_stride=16).eval()
    fast = fastdeeplab.optimize(model)
    assert fast.backend == "torch"
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(fast(x)["out"], model(x)["out"], atol=1e-3, rtol=1e-3)
