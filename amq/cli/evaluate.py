"""`amq-evaluate PATH`: evaluate exported quantized models in a fresh process.

PATH is a model directory (`<run>/models/<target>/`) or a run directory (every model under its
`models/`). Each model is reloaded with `amq.load_quantized`, measured on held-out text (and
zero-shot tasks with --tasks), and the results go to its `eval.json`. When the model directory
already holds an `eval.json` (written before saving), the same protocol and the run's own text
(its config.yaml's `data`) are reused by default, and the new perplexities are compared with the
latest earlier evaluation under that protocol, so a reload is verified, not assumed.

eval.json holds the latest evaluation at its top level and every earlier one, each with its
environment, under `history`: nothing measured before is written over. A difference in the same
environment (device, threads, torch, dtype) beyond 1e-3 is a failure (exit 1); in another
environment the sums round differently, so the difference is reported, not failed.

When the models' search run logged to W&B (its config.yaml's `logger`; `--logger` overrides), the
evaluation is a W&B run of its own in the search's group (job type `evaluate`): a table of the
re-measured models and their perplexities in the summary. Its files go to the `wandb/` folder next
to the `models/` folder evaluated.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from amq.config.compose import CONF_DIR, quiet_libraries
from amq.data.corpora import keep_parsed
from amq.errors import ConfigError, settings_of
from amq.evaluation.perplexity import PerplexityProtocol
from amq.evaluation.suite import EvalSuite
from amq.evaluation.zeroshot import TaskSettings
from amq.io import atomic_write_json
from amq.quantizers.export import LOAD_RUNTIMES, QUANT_FILE, load_quantized, read_manifest
from amq.tracking.base import MetricLogger
from amq.tracking.null_logger import NullLogger
from amq.tracking.stages import search_run_of, stage_config, stage_logger

log = logging.getLogger("amq.evaluate")
CONF_DATA = Path(CONF_DIR) / "data"
REPRODUCE_RTOL = 1e-3
JOB_TYPE = "evaluate"  # the W&B job type of the evaluation's run (the search's is `search`)
LOGGERS = ("run", "wandb", "none")  # --logger: as the search run recorded, W&B regardless, nothing


def model_dirs(path: Path) -> list[Path]:
    """The model directories PATH stands for (itself, or those under its models/)."""
    if (path / QUANT_FILE).is_file():
        return [path]
    found = sorted(p.parent for p in (path / "models").glob(f"*/{QUANT_FILE}")) if path.is_dir() else []
    if not found:
        read_manifest(path)  # raises the clear "no bit configuration" error
    return found


DEFAULT_DATA = "wiki_lee"  # for a model directory whose run left no config.yaml


def load_corpus(name: str, cache_dir: str):
    """A data config under conf/data (what it parses kept in `cache_dir`), or a text file or folder
    of *.txt files (held-out only)."""
    if Path(name).exists():
        from amq.data.corpora import TextFiles

        with settings_of(named={"heldout": "--data", "calibration": "--data"}):
            return TextFiles(calibration=name, heldout=name)
    options = sorted(p.stem for p in CONF_DATA.glob("*.yaml"))
    if name not in options:
        raise ConfigError("--data", f"unknown data config {name!r}", ", ".join(options) + ", or a text file or folder")
    return keep_parsed(instantiate(OmegaConf.load(CONF_DATA / f"{name}.yaml")), cache_dir)


def run_corpus(model_dir: Path, cache_dir: str):
    """The text the model was evaluated on: the `data` of the run's config.yaml (next to models/), or None."""
    config = model_dir.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    node = OmegaConf.load(config).get("data")
    if node is None:
        return None
    return keep_parsed(instantiate(node), cache_dir)


def earlier_same_protocol(recorded: dict, protocol: dict) -> dict | None:
    """The latest earlier evaluation (top level, then history newest first) of the same text under
    the same perplexity protocol (zero-shot tasks may differ)."""

    def key(p: dict) -> tuple:
        ppl = {"preparation": "amq", "paper_protocol": False, **(p.get("perplexity") or {})}  # records older than paper protocols
        return p.get("data"), ppl

    for ev in [recorded, *reversed(recorded.get("history", []))]:
        if key(ev.get("protocol") or {}) == key(protocol):
            return ev
    return None


def reproduction(recorded: dict, measured: dict) -> dict:
    """Relative perplexity difference per held-out text between a recorded and a new evaluation."""
    out = {}
    for text, r in recorded.get("perplexity", {}).items():
        if text in measured["perplexity"]:
            a, b = r["perplexity"], measured["perplexity"][text]["perplexity"]
            out[text] = {"recorded": a, "measured": b, "rel_diff": abs(b - a) / abs(a)}
    return out


def environment_change(recorded: dict, measured: dict) -> str:
    """Why a re-measurement may differ in the last digits: what changed since the recorded one."""
    changed = [f"{k} {recorded[k]} -> {measured[k]}" for k in ("device", "threads", "torch") if k in recorded and recorded[k] != measured.get(k)]
    return f"; computed differently ({', '.join(changed)}), and bf16 sums round differently" if changed else ""


def carried_zero_shot(recorded: dict, result: dict) -> list[str]:
    """Carry recorded zero-shot results of tasks this evaluation did not measure into `result`.

    Zero-shot tasks take minutes, so re-checking perplexity (or adding another task) must not drop
    them from eval.json; each carried row keeps its own document count and limit.
    """
    old = recorded.get("zero_shot") or {}
    new = result.setdefault("zero_shot", {})
    kept = [task for task in old if task not in new]
    for task in kept:
        new[task] = old[task]
    if not new:
        del result["zero_shot"]
    return kept


def evaluate_dir(model_dir: Path, args: argparse.Namespace, corpus_cache: dict) -> dict:
    recorded = json.loads((model_dir / "eval.json").read_text()) if (model_dir / "eval.json").is_file() else {}
    rec_proto = (recorded.get("protocol") or {}).get("perplexity", {})
    from transformers import AutoTokenizer

    recorded_env = recorded.get("environment") or {}
    if args.threads is None and recorded_env.get("threads"):
        torch.set_num_threads(int(recorded_env["threads"]))  # bf16 sums depend on it: re-check like for like
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with settings_of(named={"path": "model_dir"}):
        model = load_quantized(model_dir, args.device, args.runtime, args.compile)
    add_bos = rec_proto.get("add_bos", tokenizer.bos_token_id is not None and bool(getattr(tokenizer, "add_bos_token", False)))
    window = args.window or rec_proto.get("window", 2048)
    max_windows = args.max_windows if args.max_windows is not None else rec_proto.get("max_windows", 4)
    data = args.data
    if data is None:
        corpus = run_corpus(model_dir, args.cache_dir)
        data = f"run:{model_dir.parent.parent}" if corpus is not None else DEFAULT_DATA
        if data not in corpus_cache:
            corpus_cache[data] = (corpus if corpus is not None else load_corpus(DEFAULT_DATA, args.cache_dir)).load()
    elif data not in corpus_cache:
        corpus_cache[data] = load_corpus(data, args.cache_dir).load()
    splits = corpus_cache[data]
    with settings_of(named={"window": "--window", "max_windows": "--max-windows"}):
        protocol = PerplexityProtocol(int(window), None if max_windows in (None, 0) else int(max_windows), bool(add_bos))
        suite = EvalSuite(
            dict(splits.heldout), splits.description, protocol, TaskSettings(tuple(args.tasks), args.task_limit), Path(args.cache_dir), splits.preparation
        )
        result = {"model_dir": str(model_dir), **suite.run(model, tokenizer, model_dir.name)}
    kept = carried_zero_shot(recorded, result)
    if kept:
        log.info("%s: kept the recorded zero-shot results of %s (not re-measured)", model_dir.name, ", ".join(sorted(kept)))
    earlier = earlier_same_protocol(recorded, result["protocol"]) if recorded else None
    if earlier is not None:
        result["reproduction"] = reproduction(earlier, result)
        moved = environment_change(earlier.get("environment") or {}, result["environment"])
        result["same_environment"] = not moved
        for text, r in result["reproduction"].items():
            ok = r["rel_diff"] < REPRODUCE_RTOL
            (log.info if ok else log.warning)(
                "%s %s: perplexity %.6g, recorded %.6g (relative difference %.2e%s)",
                model_dir.name,
                text,
                r["measured"],
                r["recorded"],
                r["rel_diff"],
                "" if ok else (f": NOT reproduced{moved}" if not moved else f"; reported, not failed: the environment differs{moved}"),
            )
    elif recorded:
        log.info("%s: no earlier evaluation under this protocol and text; recorded as a new one", model_dir.name)
    if recorded and args.output is None:  # every earlier evaluation is kept, with its environment
        result["history"] = [*recorded.get("history", []), {k: v for k, v in recorded.items() if k != "history"}]
    atomic_write_json(args.output or model_dir / "eval.json", result)
    return result


def evaluation_tracker(search: Path | None, choice: str, tags: Sequence[str]) -> MetricLogger:
    """The tracker of this evaluation: the `search` run's recorded logger (`run`), W&B with
    conf/logger/wandb.yaml (`wandb`), or none. Models outside a search run (None) log nothing."""
    if choice == "none" or search is None:
        if search is None and choice == "wandb":
            log.warning("the models lie in no amq-search run directory: no search group to join in W&B, not logged")
        return NullLogger()
    node = OmegaConf.load(Path(CONF_DIR) / "logger" / "wandb.yaml") if choice == "wandb" else None
    return stage_logger(search, JOB_TYPE, node, tags)


def main(argv: Sequence[str] | None = None) -> int:
    import os

    ap = argparse.ArgumentParser(prog="amq-evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help="a model directory (models/<target>) or a run directory")
    ap.add_argument(
        "--data",
        default=None,
        help="held-out text: a config name under conf/data, or a text file or folder (default: the run's own text, from its config.yaml; else wiki_lee)",
    )
    ap.add_argument("--window", type=int, default=None, help="perplexity window in tokens (default: as recorded, else 2048)")
    ap.add_argument("--max-windows", type=int, default=None, help="windows per held-out text (0: all; default: as recorded, else 4)")
    ap.add_argument("--tasks", nargs="*", default=[], help="zero-shot tasks through lm-eval, e.g. bigbench_social_iqa")
    ap.add_argument("--task-limit", type=int, default=None, help="documents per zero-shot task (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument(
        "--runtime",
        choices=LOAD_RUNTIMES,
        default="dequantized",
        help="dequantized: keep each dequantized weight; packed: keep linears packed, dequantize per call (small memory); fast: packed-bit kernels (amq.runtime)",
    )
    ap.add_argument("--compile", action="store_true", help="dequantize through torch.compile (same values; faster with --runtime packed on a GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as recorded in eval.json, else torch's default)")
    ap.add_argument("--output", type=Path, default=None, help="write the result here instead of <model dir>/eval.json (one model only)")
    ap.add_argument("--cache-dir", default=os.environ.get("AMQ_CACHE_DIR", str(Path.home() / ".cache" / "amq")))
    ap.add_argument(
        "--logger",
        default="run",
        choices=LOGGERS,
        help="run: log to W&B as the models' search run did (its config.yaml); wandb: to W&B regardless (offline unless WANDB_MODE says otherwise); none",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not args.path.exists():
            raise ConfigError("path", f"{args.path} does not exist", "a model directory (<run>/models/<target>) or a run directory")
        dirs = model_dirs(args.path)
        if args.tasks:
            from amq.evaluation.zeroshot import prepare_zero_shot

            prepare_zero_shot(args.tasks, args.cache_dir)
        if args.output and len(dirs) > 1:
            raise ConfigError("--output", f"{args.path} holds {len(dirs)} models", "omit --output for a run directory")
        tags = [*(f"task={t}" for t in args.tasks), f"runtime={args.runtime}"]
        search = search_run_of(dirs[0])
        tracker = evaluation_tracker(search, args.logger, tags)  # bad settings fail before the work
        home = dirs[0].parent.parent  # the run (or finalized/<time>/) directory that holds models/
        stage = {"job_type": JOB_TYPE, "models": [str(d) for d in dirs], "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        tracker.start(str(home), stage_config(search, stage=stage) if search is not None else {"stage": stage}, name=home.name)
        failed = True
        try:
            cache: dict = {}
            results = [evaluate_dir(d, args, cache) for d in dirs]
            tracker.log_evaluations(results)
            failed = False
        finally:
            tracker.finish(failed=failed)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    failed = [r["model_dir"] for r in results if r.get("same_environment", True) for x in r.get("reproduction", {}).values() if x["rel_diff"] >= REPRODUCE_RTOL]
    print(
        json.dumps(
            [
                {
                    "model_dir": r["model_dir"],
                    "perplexity": {k: v["perplexity"] for k, v in r["perplexity"].items()},
                    **({"zero_shot": {k: v.get("acc") for k, v in r["zero_shot"].items()}} if r.get("zero_shot") else {}),
                }
                for r in results
            ],
            indent=2,
        )
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
