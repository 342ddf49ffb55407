"""Benchmarks and long runs, run by hand from the checkout as modules
(`.venv/bin/python -m bench.NAME`), so that they import the test helpers as
`tests.X` and each other as `bench.X` without editing sys.path."""
