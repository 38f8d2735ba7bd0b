"""Alternatives to the AMQ search, for benchmarking it at equal true evaluations.

`greedy` and `knapsack` allocate bits from the sensitivity table under the additive damage model
of `amq.search.seeding.additive_damage`; `evolution` is the search without its predictor (NSGA-II
on true evaluations). `scripts/bench_quality.py` runs them all side by side.
"""
