"""Triton kernels for fastdeeplab, imported as ``fastdeeplab.kernels``.

Every kernel has a plain-PyTorch twin in :mod:`fastdeeplab.kernels.reference`; tests, benchmarks and the
export path all use that one copy. Triton itself is imported lazily, so this package imports on machines
without it.
"""
