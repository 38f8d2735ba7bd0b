"""Kill anywhere: SIGKILL at random moments, rerun the same command with resume=auto, and end with
exactly the archive and front of an uninterrupted run (scripts/kill_resume.py does it 20 times).
Bit-identical metrics across processes, which this relies on, are checked by test_pipeline.py.

The moments are random (seeded from AMQ_KILL_SEED when set, printed otherwise) and aimed at the
proxy build and the sensitivity stage (the chain starts with cold caches) and the middle of a batch
of true evaluations; the script adds start-up and the predictor fit and NSGA-II of later iterations.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
from conftest import ROOT, SMOKE

sys.path.insert(0, str(ROOT / "scripts"))
from kill_resume import MOMENTS, compare, kill_and_resume  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # make test-all; test_faults.py and test_time_budget.py cover resume in make test


def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(smoke_run, tmp_path):
    seed = int(os.environ.get("AMQ_KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    kinds = ["proxy build", "mid-batch"]  # scripts/kill_resume.py covers every moment, 20 kills
    assert set(kinds) <= set(MOMENTS)
    with_cache = [o for o in SMOKE if not o.startswith("eval_cache=")]  # resumed runs use it, as users' do
    chain = kill_and_resume([*with_cache, "seed=3"], tmp_path, len(kinds), rng, kinds=kinds)
    result = compare(smoke_run[0], chain.run_dir)
    where = "; ".join(f"{k.moment} (last log: {k.last_line})" for k in chain.kills)
    context = f"AMQ_KILL_SEED={seed}: {len(chain.kills)} kills: {where}; {result}"
    assert chain.kills, context
    assert result["lost"] == result["duplicated"] == result["different"] == result["extra"] == 0, context
    assert result["identical"] == result["reference"], context
    assert result["same_order"] and result["same_front"], context
