"""Benchmarks on real music (kept outside the package and the test suite)."""
