"""The benchmarks, each run from the repository root as ``python -m bench.NAME`` (README,
``make bench``): a package, so they import ``pcm_service`` and ``tests.support`` as they are,
with no edit of the import path."""
