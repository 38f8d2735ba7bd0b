"""Kill a search with SIGKILL at random moments, resume it each time, compare with an uninterrupted run.

A chain: start `amq-search <overrides> resume=auto`, wait for a randomly chosen moment (a time
after start, a log line that starts a phase plus a random delay, or the archive reaching a random
length plus a delay), SIGKILL it, and rerun the very same command, until the chain's kills are
spent or a process finishes first; the last process runs to the end. Every chain starts with cold
proxy, sensitivity and evaluation caches (the converted model is shared), so kills land in the
proxy build and the sensitivity stage as well as in the search. Each chain's final archive and
front are compared with those of one uninterrupted run with the same seed:

    lost        configurations the uninterrupted run evaluated and the killed one does not have
    duplicated  archive lines whose configuration an earlier line already holds
    identical   configurations present in both with bit-identical metric and the same iteration
    different   present in both, with another metric or iteration
    extra       configurations only the killed run has

    python scripts/kill_resume.py                         # 20 kills, at most 5 per search, smoke budget
    python scripts/kill_resume.py --kills 6 --seed 7 budget.iterations=4

Extra arguments are Hydra overrides for every run. The metric must be bit-identical across
processes for "identical" to be meaningful: fixed num_threads and metric.compile=false (the
defaults here).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from amq.bench.script_args import script_parser

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OVERRIDES = ["budget=smoke", "logger=none", "metric.compile=false", "num_threads=2", "seed=3", "finalize.enabled=false"]
USER_CACHE = Path(os.environ.get("AMQ_CACHE_DIR", Path.home() / ".cache" / "amq"))


# ---------------------------------------------------------------------------- one process
class Process:
    """`python -m amq.train_search` with its stderr read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "amq.train_search", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def seen(self, marker: str) -> bool:
        return any(marker in line for line in list(self.lines))

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()  # leave no search running behind a failed check
            raise
        self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGKILL)


# ---------------------------------------------------------------------------- kill moments
@dataclass(frozen=True)
class Moment:
    """When to kill: `delay` seconds after start, or after a log line / an archive length shows up."""

    kind: str  # "time" | "log" | "archive"
    marker: str | int | None
    delay: float

    def describe(self) -> str:
        if self.kind == "time":
            return f"{self.delay:.1f}s after start"
        what = f"log '{self.marker}'" if self.kind == "log" else f"archive line {self.marker}"
        return f"{self.delay:.2f}s after {what}"


# Kinds of moments: a time after start, or a log line that starts a phase plus a random delay
# within about that phase's length, or the archive reaching a length (in the middle of a batch).
MOMENTS = ("startup", "proxy build", "sensitivity", "mid-batch", "predictor and NSGA-II")


def random_moment(rng: random.Random, archived: int, kind: str | None = None) -> Moment:
    kind = kind or rng.choice(MOMENTS)
    if kind == "startup":  # imports, model and data loading, proxy loading, or further
        return Moment("time", None, rng.uniform(0.0, 30.0))
    if kind == "proxy build":  # quantizing (cold cache) or loading the proxy
        return Moment("log", "data:", rng.uniform(0.0, 20.0))
    if kind == "sensitivity":  # measuring (cold cache), pruning, the start of the initial design
        return Moment("log", "proxy ready", rng.uniform(0.0, 6.0))
    if kind == "mid-batch":
        return Moment("archive", archived + rng.randint(1, 4), rng.uniform(0.0, 0.3))
    if kind == "predictor and NSGA-II":  # the next iteration's fit and search begin after this line
        return Moment("log", "in archive, hypervolume", rng.uniform(0.0, 2.0))
    raise ValueError(f"unknown moment kind {kind!r} (one of {', '.join(MOMENTS)})")


def _archive_lines(out_dir: Path) -> int:
    return sum(p.read_text().count("\n") for p in out_dir.glob("search/runs/*/archive.jsonl"))


def run_until(proc: Process, moment: Moment, out_dir: Path, timeout: float) -> bool:
    """Wait for `moment` and SIGKILL; False if the process ended first."""
    deadline = time.monotonic() + timeout
    if moment.kind == "log":
        while proc.running() and not proc.seen(str(moment.marker)) and time.monotonic() < deadline:
            time.sleep(0.02)
    elif moment.kind == "archive":
        while proc.running() and _archive_lines(out_dir) < int(moment.marker) and time.monotonic() < deadline:
            time.sleep(0.01)
    end = time.monotonic() + moment.delay
    while proc.running() and time.monotonic() < end:
        time.sleep(0.01)
    if not proc.running():
        return False
    proc.kill()
    proc.wait(timeout=60)
    return True


# ---------------------------------------------------------------------------- a chain of kills
@dataclass
class Kill:
    moment: str
    last_line: str


@dataclass
class Chain:
    """One search, killed `len(kills)` times and resumed after each kill until it finished."""

    run_dir: Path
    kills: list[Kill] = field(default_factory=list)
    seconds: float = 0.0


def cold_cache(cache_dir: Path) -> dict[str, str]:
    """A cache folder with only the converted model shared: proxy, sensitivity, evaluations start cold."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    (USER_CACHE / "models").mkdir(parents=True, exist_ok=True)
    link = cache_dir / "models"
    if not link.exists():
        link.symlink_to(USER_CACHE / "models", target_is_directory=True)
    return {"AMQ_CACHE_DIR": str(cache_dir)}


def run_env(out_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "AMQ_OUTPUT_DIR": str(out_dir), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.update(extra or {})
    return env


def _last_message(lines: list[str]) -> str:
    """The last log message before the kill, shortened: where the kill landed."""
    for line in reversed(lines):
        if "] - " in line:
            return line.split("] - ", 1)[1][:90]
    return "(before the first log line)"


def _finish(proc: Process, timeout: float) -> None:
    if proc.wait(timeout) != 0:
        raise RuntimeError("a resumed run failed:\n" + "\n".join(proc.lines[-30:]))


def kill_and_resume(overrides: list[str], work: Path, max_kills: int, rng: random.Random, kinds: list[str] | None = None, timeout: float = 900) -> Chain:
    """Up to `max_kills` SIGKILLs at random moments (of the given `kinds` in turn, else of random
    kinds), each followed by the same command with resume=auto.

    The chain ends early when a process finishes before the moment aimed at.
    """
    t0 = time.monotonic()
    out_dir = work / "out"
    env = run_env(out_dir, cold_cache(work / "cache"))
    args = [*overrides, "resume=auto"]
    chain = Chain(run_dir=out_dir)
    while True:
        proc = Process(args, env)
        if len(chain.kills) == max_kills:
            _finish(proc, timeout)
            break
        moment = random_moment(rng, _archive_lines(out_dir), kinds[len(chain.kills)] if kinds else None)
        if not run_until(proc, moment, out_dir, timeout):
            _finish(proc, timeout)
            break
        chain.kills.append(Kill(moment.describe(), _last_message(proc.lines)))
    runs = [p for p in (out_dir / "search" / "runs").iterdir() if (p / "summary.json").is_file()]
    if len(runs) != 1:
        raise RuntimeError(f"expected one finished run under {out_dir}, found {len(runs)}")
    chain.run_dir, chain.seconds = runs[0], time.monotonic() - t0
    return chain


# ---------------------------------------------------------------------------- comparison
def _archive(run_dir: Path) -> list[tuple[tuple[int, ...], object, int]]:
    rows = []
    for line in (run_dir / "archive.jsonl").read_text().splitlines():
        d = json.loads(line)
        rows.append((tuple(d["genes"]), next(iter(d["metrics"].values())), d["iteration"]))
    return rows


def _front(run_dir: Path) -> list[tuple[tuple[int, ...], float]]:
    front = json.loads((run_dir / "front.json").read_text())
    return [(tuple(r["genes"]), r[front["metric"]]) for r in front["front"]]


def compare(reference: Path, resumed: Path) -> dict[str, int | bool]:
    """Counts of lost / duplicated / identical / different / extra configurations, and whether order and front match."""
    ref, got = _archive(reference), _archive(resumed)
    ref_map = {g: (m, it) for g, m, it in ref}
    got_map: dict[tuple[int, ...], tuple[object, int]] = {}
    duplicated = 0
    for g, m, it in got:
        if g in got_map:
            duplicated += 1
        else:
            got_map[g] = (m, it)
    both = ref_map.keys() & got_map.keys()
    return {
        "reference": len(ref),
        "lost": len(ref_map.keys() - got_map.keys()),
        "duplicated": duplicated,
        "identical": sum(ref_map[g] == got_map[g] for g in both),
        "different": sum(ref_map[g] != got_map[g] for g in both),
        "extra": len(got_map.keys() - ref_map.keys()),
        "same_order": [g for g, _, _ in ref] == [g for g, _, _ in got],
        "same_front": _front(reference) == _front(resumed),
    }


def uninterrupted(overrides: list[str], work: Path, timeout: float = 900) -> Path:
    """The reference: one run, never killed, cold caches of its own."""
    out_dir = work / "out"
    proc = Process(overrides, run_env(out_dir, cold_cache(work / "cache")))
    if proc.wait(timeout) != 0:
        raise RuntimeError("the uninterrupted run failed:\n" + "\n".join(proc.lines[-30:]))
    (run_dir,) = (out_dir / "search" / "runs").iterdir()
    return run_dir


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides for every run (added to the defaults)")
    ap.add_argument("--kills", type=int, default=20, help="kills in all")
    ap.add_argument("--per-chain", type=int, default=5, help="kills at most in one search before it may finish")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: random, printed)")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "kill_resume" / time.strftime("%Y%m%d-%H%M%S"))
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    overrides = [*DEFAULT_OVERRIDES, *args.overrides]
    print(f"kill moments seed {seed}; overrides {' '.join(overrides)}; work in {args.work}", flush=True)

    t0 = time.monotonic()
    reference = uninterrupted(overrides, args.work / "reference")
    print(f"uninterrupted run: {len(_archive(reference))} evaluations in {time.monotonic() - t0:.0f}s", flush=True)
    counts = ("lost", "duplicated", "identical", "different", "extra")
    totals = dict.fromkeys(("kills", "chains", *counts), 0)
    all_same = True
    while totals["kills"] < args.kills:
        chain = kill_and_resume(overrides, args.work / f"chain{totals['chains']}", min(args.per_chain, args.kills - totals["kills"]), rng)
        result = compare(reference, chain.run_dir)
        all_same &= bool(result["same_order"] and result["same_front"])
        totals["chains"] += 1
        totals["kills"] += len(chain.kills)
        for k in counts:
            totals[k] += int(result[k])
        print(f"\nchain {totals['chains']}: {len(chain.kills)} kills, {chain.seconds:.0f}s; {json.dumps(result)}", flush=True)
        for i, kill in enumerate(chain.kills, 1):
            print(f"  kill {i}: {kill.moment:<34} last log: {kill.last_line}", flush=True)
    print(
        f"\n{totals['kills']} kills in {totals['chains']} searches: lost {totals['lost']}, duplicated {totals['duplicated']}, "
        f"identical {totals['identical']}, different {totals['different']}, extra {totals['extra']}; "
        f"archive order and front identical to the uninterrupted run's in every search: {all_same}"
    )
    ok = all_same and totals["lost"] == totals["duplicated"] == totals["different"] == totals["extra"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
