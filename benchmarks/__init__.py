"""Benchmarks for dpfed (run as modules, e.g. ``python -m benchmarks.dp_step``); not part of the package."""
