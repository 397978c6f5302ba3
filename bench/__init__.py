"""Benchmarks. `python -m bench --help` runs the serving benchmark; the other scripts here measure export choices."""
