"""The benchmark suite: ``python -m bench.run`` (``--smoke`` for the CI check)."""
