"""The fastdeeplab benchmark suite: ``pytest bench/`` or ``fastdeeplab bench`` (see bench/conftest.py).

A package only so that its helper modules (``bench._impls``, ``bench._metrics``, ...) import as
``bench.*`` for the suite and for ``tests/test_bench_*.py``; it is not installed with fastdeeplab.
"""
