"""Benchmarks of dealledger, run with `make bench` or `python -m bench [NAME ...]`.

Each benchmark is a module of this package with a `main() -> int`; the
registry in `bench.__main__` names them. Results are printed, and written as
JSON under bench/results/ (not kept in git).
"""
