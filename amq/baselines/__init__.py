"""Alternatives to the AMQ search, for benchmarking it at equal true evaluations.

`greedy` allocates bits from the sensitivity table under the additive damage model of
`amq.search.seeding.additive_damage` (the exact allocation, `amq.search.knapsack`, seeds the search
itself); `evolution` is the search without its predictor (NSGA-II on true evaluations).
`scripts/bench_quality.py` runs them all side by side.
"""
