"""Quality predictors: map a gene vector to the predicted metric (fit on truly evaluated configs)."""
