"""Command-line tools besides `amq-search` (amq/train_search.py): `amq-finalize`, `amq-evaluate`,
`amq-export` and `amq-compare`."""
