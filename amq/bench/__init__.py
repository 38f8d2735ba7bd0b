"""Helpers of the benchmark scripts (scripts/bench_*.py): timing of the search's stages and the
cost model that projects a whole search from them."""
