"""The test suite, a package: its helpers are imported as ``tests.support.X`` (by the tests, by
``bench/`` and by TaskVine's library processes, which get the repository root on PYTHONPATH), so
each helper is one module object."""
