"""The search: space, archive, Pareto utilities, NSGA-II on the predictor, and the iterative loop."""
