"""Benchmarks (``bench/run``); ``workload`` is shared with the tests."""
