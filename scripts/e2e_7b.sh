#!/usr/bin/env bash
# The whole pipeline at 7B scale on one GPU, from the real entrypoints: amq-search on a
# Llama-2-7B-shaped model with random weights (proxy, sensitivity, search, GPTQ finalize of two
# targets), then amq-finalize with AWQ on the same run. Every quality number is meaningless
# (random weights); the stage times and peak GPU memory are in the run's summary.json (`stages`).
# The cost model's projection of the same work: scripts/bench_gpu.py with the same WORK overrides.
#
# Needs, beside the repository: TOK, a directory holding a tokenizer (e.g. the embedded SmolLM2's,
# ~/.cache/amq/models/smollm2-135m-instruct-*/tokenizer*.json), and TEXT, the text files written by
# `python scripts/dump_texts.py TEXT` (on a machine without the embedded corpora).
# Usage: scripts/e2e_7b.sh TOK TEXT   (docs/benchmarks.md "7B end to end on one H200")
set -euo pipefail
TOK=${1:?tokenizer directory} TEXT=${2:?text directory}
PY=${PYTHON:-python3}
WORK="budget.n_samples=4 budget.sensitivity_samples=4 budget.n_initial_random=47 budget.iterations=3"
FIN="finalize.n_samples=16 finalize.max_windows=8 finalize.baselines=false finalize.extra_front_points=0 finalize.formats=[]"
echo "== search $(date +%T)"
$PY -m amq.train_search model=random model.source.arch=llama2-7b model.source.tokenizer="$TOK" \
  data=text data.calibration="$TEXT/calibration.txt" "data.heldout={wiki:\"$TEXT/wiki.txt\",lee:\"$TEXT/lee.txt\"}" \
  budget=paper $WORK predictor=rbf metric=jsd_hidden search.kappa=0.0 quantizer.group_size=128 'search.targets=[3.25,3.75]' \
  logger=none eval_cache=none finalizer=gptq $FIN
RUN=$(ls -d "${AMQ_OUTPUT_DIR:-outputs}"/search/runs/* | tail -1)
echo "== awq $(date +%T)"
$PY -m amq.cli.finalize "$RUN" finalizer=awq $FIN
echo "== done $(date +%T): $RUN/summary.json"
