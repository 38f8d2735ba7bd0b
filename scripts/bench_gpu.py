"""Speed benchmark at 7B scale: a model of a published architecture with random weights.

Timing does not depend on weight values, so a Llama-2-7B-shaped model with random bf16 weights
measures what a search on the real model costs, with no download. Protocol: random token ids in
windows of `budget.seq_len` tokens, the search space and amounts of `experiment=paper_llama2_7b`
({2, 3, 4} bits, group 128, the `paper` budget), the proxy in `packed` storage on the device, the
configured metric (JSD). Measured, per calibration amount:

- proxy build time and its device memory against the bf16 model's size;
- the forward floor (the unquantized forward over the calibration tokens) and the time of a true
  evaluation (swap a random configuration in, then the metric), for each metric variant;
- the sensitivity stage's cost per linear;
- the predictor's fit and one NSGA-II run at several archive sizes, for one or more variants of
  the configured predictor side by side (e.g. the RBF's scipy and torch backends);

and from these the projected wall time of the whole search (amq.bench.cost_model).

    python scripts/bench_gpu.py --json gpu.json                       # Llama-2-7B shape, cuda
    python scripts/bench_gpu.py --samples 128 8 --variants probs:64 hidden:1024
    python scripts/bench_gpu.py --calibration-from gpu.json --predictors backend=scipy backend=torch,device=cuda
    python scripts/bench_gpu.py budget.seq_len=32 --arch tiny --device cpu   # seconds, on the CPU

Hydra overrides of conf/train_search.yaml (applied after the preset above) go before the options.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from amq.bench.cost_model import MeasuredCurve, SearchWork, StageCosts, project
from amq.bench.script_args import script_parser
from amq.bench.timing import (
    forward_floor_seconds,
    search_step_seconds,
    sensitivity_seconds_per_linear,
    spread_linears,
    swap_seconds,
    synchronizer,
    true_eval_seconds,
)
from amq.config.compose import build, parse_overrides
from amq.io import atomic_write_json
from amq.modeling.discovery import discover_layout
from amq.modeling.random_init import ARCHS, random_llama
from amq.proxy.bank import ProxyBank
from amq.search.space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("bench_gpu")

PRESET = ["experiment=paper_llama2_7b", "logger=none", "quantizer.storage=packed"]


def gpu_bytes(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_metric_class(path: Path) -> type:
    """`OutputDivergence` from another revision's amq/metrics/divergence.py (before/after comparisons)."""
    spec = importlib.util.spec_from_file_location("divergence_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.OutputDivergence


def reference_bytes(metric) -> int:
    tensors = [t for ref in metric._refs for t in (ref if isinstance(ref, tuple) else (ref,))]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_variant(name: str, make_metric, bank: ProxyBank, configs: list, repeats: int, device: torch.device) -> dict:
    """Reference time and memory, then the true evaluation time, of one metric implementation."""
    sync = synchronizer(device)
    bank.restore()
    free_device_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = gpu_bytes(device)
    try:
        sync()
        t0 = time.perf_counter()
        metric = make_metric()
        sync()
        out = {"reference_s": time.perf_counter() - t0, "reference_bytes": reference_bytes(metric)}
        out["reference_device_bytes"] = gpu_bytes(device) - before
        out["true_eval_s"] = true_eval_seconds(bank, metric, configs, repeats, sync)
        bank.apply(configs[0])
        out["value_of_first_config"] = metric.evaluate(bank.model)
        if device.type == "cuda":
            out["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError as exc:
        out = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    log.info("metric %s: %s", name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()})
    metric = None
    free_device_memory(device)
    return out


def parse_variant(text: str) -> tuple[str, int]:
    reference, _, chunk = text.partition(":")
    return reference, int(chunk or 64)


def run_calibration(cfg: DictConfig, args, model, bank: ProxyBank, space: SearchSpace, n_samples: int, device: torch.device) -> dict:
    """Everything that depends on the calibration amount: floor, true evaluations, sensitivity."""
    sync = synchronizer(device)
    seq_len, batch_size = int(cfg.budget.seq_len), int(cfg.metric.batch_size)
    gen = torch.Generator().manual_seed(int(cfg.data_seed))
    tokens = torch.randint(0, model.config.vocab_size, (n_samples, seq_len), generator=gen)
    res: dict = {"n_samples": n_samples, "seq_len": seq_len, "tokens": n_samples * seq_len}

    bank.restore()
    res["forward_floor_s"] = forward_floor_seconds(model, tokens, batch_size, args.repeats, sync)
    log.info("%d x %d tokens: forward floor %.3fs", n_samples, seq_len, res["forward_floor_s"])

    configs = [space.to_bits(g) for g in space.random(np.random.default_rng(int(cfg.seed)), args.repeats + 1)]
    variants = {}
    if args.baseline_divergence:
        cls = load_metric_class(args.baseline_divergence)
        variants["baseline:64"] = lambda: cls(model, tokens, kind=cfg.metric.kind, batch_size=batch_size, chunk_tokens=64, compile=bool(cfg.metric.compile))
    for text in args.variants:
        reference, chunk = parse_variant(text)
        variants[f"{reference}:{chunk}"] = lambda r=reference, c=chunk: build(cfg.metric, "metric", model=model, tokens=tokens, reference=r, chunk_tokens=c)
    res["variants"] = {name: measure_variant(name, make, bank, configs, args.repeats, device) for name, make in variants.items()}
    for v in res["variants"].values():
        if "true_eval_s" in v:
            v["ratio_to_floor"] = v["true_eval_s"] / res["forward_floor_s"]

    # the sensitivity stage with the configured metric, on its (possibly smaller) share of the tokens
    configured = f"{cfg.metric.reference}:{int(cfg.metric.chunk_tokens)}"
    bank.restore()  # the reference comes from the unquantized model
    metric = build(cfg.metric, "metric", model=model, tokens=tokens)
    if hasattr(metric, "reuse_prefix"):  # passes start at the probed block, as in a search
        metric.reuse_prefix(model.get_submodule(bank.layout.blocks_name))
    sens = metric.subset(min(int(cfg.budget.sensitivity_samples), n_samples))
    names = spread_linears(bank.layout.names, args.sensitivity_linears)
    res["sensitivity"] = {
        "metric": configured,
        "n_samples": int(sens.tokens.shape[0]),
        "per_linear_s": sensitivity_seconds_per_linear(bank, sens, names, bank.bits[0], bank.bits[-1], sync),
    }
    res["configured_variant"] = configured
    metric = sens = None
    free_device_memory(device)
    return res


MEASURED_ON_THE_DEVICE = ("device", "torch", "model_init_s", "bf16_model_bytes", "n_linears", "proxy", "swap_s_eager", "swap_s", "calibration")


def shapes_only_space(arch: str, bits: list[int], group_size: int) -> SearchSpace:
    """The search space of `arch` from its shapes alone (the model on the meta device: no memory)."""
    return SearchSpace(discover_layout(random_llama(arch, "meta")).linears, bits, group_size)


def measure_on_device(cfg: DictConfig, args: argparse.Namespace, device: torch.device, bits: list[int], samples: list[int], res: dict) -> SearchSpace:
    """Model, proxy, swaps, and for each calibration amount the floor, true evaluations and
    sensitivity (the MEASURED_ON_THE_DEVICE entries of `res`); returns the search space."""
    # model and proxy
    t0 = time.perf_counter()
    model = random_llama(args.arch, device)
    res["model_init_s"] = time.perf_counter() - t0
    layout = discover_layout(model)
    quantizer = build(cfg.quantizer, "quantizer")
    quantizer.validate(bits, layout.linears)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["bf16_model_bytes"] = model_bytes
    res["n_linears"] = len(layout.linears)
    before = gpu_bytes(device)
    bank = ProxyBank(model, layout, quantizer, bits, storage=quantizer.storage)
    synchronizer(device)()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="amq-bench-proxy-") as cache:  # written to a disk cache as a search does
        bank.build(cache, f"random-{args.arch}")
        synchronizer(device)()
        build_s = time.perf_counter() - t0
    res["proxy"] = {
        "storage": quantizer.storage,
        "build_s": build_s,
        "bank_bytes": bank.memory_bytes(),
        "bank_over_model": bank.memory_bytes() / model_bytes,
        "device_bytes_added": gpu_bytes(device) - before,
    }
    if device.type == "cuda":
        res["proxy"]["device_bytes_model_and_bank"] = gpu_bytes(device)
        res["proxy"]["model_and_bank_over_model"] = gpu_bytes(device) / model_bytes
    log.info("proxy: %s", res["proxy"])

    space = SearchSpace(layout.linears, bits, quantizer.group_size)
    a, b = (space.to_bits(g) for g in space.random(np.random.default_rng(0), 2))
    bank.fused_swaps = False  # HQQ's eager dequantization, then the compiled one
    res["swap_s_eager"] = swap_seconds(bank, a, b, args.repeats, synchronizer(device))
    bank.fused_swaps = True
    res["swap_s"] = swap_seconds(bank, a, b, args.repeats, synchronizer(device))
    log.info("swap of a full configuration: %.2f ms eager, %.2f ms fused", res["swap_s_eager"] * 1e3, res["swap_s"] * 1e3)

    res["calibration"] = []
    for n in samples:
        res["calibration"].append(run_calibration(cfg, args, model, bank, space, n, device))
        save(res, args.json)

    return space


def main() -> None:
    ap = script_parser(__doc__, "Hydra overrides applied after the paper preset")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, nargs="+", default=None, help="calibration windows to measure (default: the budget's n_samples, then 8)")
    ap.add_argument("--variants", nargs="+", default=None, help="metric variants reference:chunk_tokens (default: probs:64 and the configured one)")
    ap.add_argument("--baseline-divergence", type=Path, default=None, help="also time OutputDivergence from this file (another revision's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sensitivity-linears", type=int, default=2, help="linears timed for the sensitivity estimate")
    ap.add_argument(
        "--fit-sizes", type=int, nargs="+", default=None, help="archive sizes for the predictor fit and NSGA-II (default: 5 spread over the budget's)"
    )
    ap.add_argument(
        "--predictors",
        nargs="+",
        default=[""],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="predictor variants timed side by side in the search step: overrides of the configured predictor (default: it as configured)",
    )
    ap.add_argument("--search-step-from", type=Path, default=None, help="reuse the predictor/NSGA-II timings of an earlier run's --json (same machine)")
    ap.add_argument(
        "--calibration-from",
        type=Path,
        default=None,
        help="reuse the model, proxy and calibration measurements of an earlier run's --json and build no model (with --search-step-from too: only the projection is computed)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(args.device)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train_search", overrides=[*PRESET, *args.overrides])
    torch.manual_seed(int(cfg.seed))
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    if args.variants is None:
        args.variants = list(dict.fromkeys(["probs:64", f"{cfg.metric.reference}:{int(cfg.metric.chunk_tokens)}"]))
    samples = args.samples or list(dict.fromkeys([int(cfg.budget.n_samples), 8]))
    bits = [int(b) for b in cfg.search.bits]
    res: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "arch": {"name": args.arch, **ARCHS[args.arch]},
        "overrides": [*PRESET, *args.overrides],
        "bits": bits,
        "group_size": int(cfg.quantizer.group_size),
    }

    if args.calibration_from:  # earlier measurements of the model's side; no model is built
        earlier = json.loads(args.calibration_from.read_text())
        res.update({k: earlier[k] for k in MEASURED_ON_THE_DEVICE if k in earlier}, calibration_from=str(args.calibration_from))
        space = None if args.search_step_from else shapes_only_space(args.arch, bits, int(cfg.quantizer.group_size))
    else:
        space = measure_on_device(cfg, args, device, bits, samples, res)

    # the CPU side of an iteration: predictor fit and NSGA-II (the budget's predictor and settings)
    work = SearchWork.from_budget(cfg.budget, len(bits), res["n_linears"])
    if args.search_step_from:
        res["search_step"] = {**search_step_of(json.loads(args.search_step_from.read_text())), "from": str(args.search_step_from)}
    else:
        all_sizes = work.archive_sizes()
        sizes = args.fit_sizes or sorted({all_sizes[round(q * (len(all_sizes) - 1))] for q in (0, 0.25, 0.5, 0.75, 1)})
        res["search_step"] = {"predictor": cfg.predictor._target_, "cpu_threads": torch.get_num_threads(), "variants": {}}
        for spec in args.predictors:
            res["search_step"]["variants"][spec or "configured"] = measure_search_step(cfg, space, spec, sizes, res, args.json)
    curves = {
        name: tuple(MeasuredCurve.from_steps(v["by_archive_size"], key) for key in ("fit_s", "nsga_s")) for name, v in res["search_step"]["variants"].items()
    }

    res["work"] = {"true_evaluations": work.true_evaluations, "iterations": work.iterations, "sensitivity_evaluations": work.n_linears + 1}
    res["projection"] = {}
    for cal in res["calibration"]:
        chosen = cal["variants"].get(cal["configured_variant"], {})
        if "true_eval_s" not in chosen:
            continue
        res["projection"][f"{cal['n_samples']}x{cal['seq_len']}"] = {
            name: project(
                work, StageCosts(res["proxy"]["build_s"], chosen["reference_s"], chosen["true_eval_s"], cal["sensitivity"]["per_linear_s"], fit, nsga)
            )
            for name, (fit, nsga) in curves.items()
        }

    if device.type == "cuda" and not args.calibration_from:
        res["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
    save(res, args.json)
    print(json.dumps(res, indent=2, default=str))
    print(summary(res))


def search_step_of(earlier: dict) -> dict:
    """The search-step timings of an earlier run's JSON (runs before predictor variants had one, unnamed)."""
    step = earlier["search_step"]
    if "variants" in step:
        return step
    return {
        **{k: v for k, v in step.items() if k != "by_archive_size"},
        "variants": {"configured": {"overrides": {}, "by_archive_size": step["by_archive_size"]}},
    }


def measure_search_step(cfg: DictConfig, space: SearchSpace, spec: str, sizes: list[int], res: dict, path: Path | None) -> dict:
    """Fit and NSGA-II time of one predictor variant at each archive size, after one warm-up step
    (CUDA context, solver handles and compiled kernels are set up once per search, not per step)."""
    overrides = parse_overrides(spec)
    make_predictor, nsga = build(cfg.predictor, "predictor", **overrides), build(cfg.search.nsga, "search")
    search_step_seconds(space, make_predictor, nsga, min(sizes))
    out = {"overrides": overrides, "by_archive_size": []}
    for n in sizes:
        out["by_archive_size"].append(search_step_seconds(space, make_predictor, nsga, n))
        log.info("search step (%s) at %d archived configurations: %s", spec or "configured predictor", n, out["by_archive_size"][-1])
        save(res, path)
    return out


def save(res: dict, path: Path | None) -> None:
    """Write what is measured so far (a run stopped early keeps its finished stages)."""
    if path:
        atomic_write_json(path, res)


def summary(res: dict) -> str:
    """The headline numbers against the targets, one line each."""
    model = res["bf16_model_bytes"]
    p = res["proxy"]
    lines = [
        f"device {res['device']}; {res['arch']['name']} ({res['n_linears']} linears), bf16 model {model / 2**30:.2f} GiB",
        f"proxy build {p['build_s']:.1f}s; bank {p['bank_bytes'] / 2**30:.2f} GiB = {p['bank_over_model']:.3f}x the model"
        + (f"; model + bank on the device {p['model_and_bank_over_model']:.3f}x" if "model_and_bank_over_model" in p else ""),
        f"swap of a full configuration {res['swap_s'] * 1e3:.1f} ms ({res['swap_s_eager'] * 1e3:.1f} ms with HQQ's eager dequantization)",
    ]
    for cal in res["calibration"]:
        lines.append(
            f"{cal['n_samples']}x{cal['seq_len']} tokens: floor {cal['forward_floor_s']:.3f}s; sensitivity {cal['sensitivity']['per_linear_s']:.3f}s/linear"
        )
        for name, v in cal["variants"].items():
            if "error" in v:
                lines.append(f"  {name:>12}: {v['error']}")
            else:
                lines.append(
                    f"  {name:>12}: true eval {v['true_eval_s']:.3f}s = {v['ratio_to_floor']:.3f}x floor; reference {v['reference_bytes'] / 2**30:.2f} GiB in {v['reference_s']:.2f}s; value {v['value_of_first_config']:.6g}"
                )
    for name, v in res["search_step"]["variants"].items():
        steps = "; ".join(f"{s['n_points']}: fit {s['fit_s']:.2f}s, NSGA-II {s['nsga_s']:.2f}s" for s in v["by_archive_size"])
        lines.append(f"search step, predictor {name}: {steps}")
    for key, by_predictor in res["projection"].items():
        for name, proj in by_predictor.items():
            parts = ", ".join(f"{k[:-2]} {v / 60:.1f}" for k, v in proj.items() if k != "total_s")
            lines.append(
                f"projected {res['work']['true_evaluations']}-evaluation search at {key}, predictor {name}: {proj['total_s'] / 3600:.2f} h ({parts} min)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
