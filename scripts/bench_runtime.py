"""Memory and speed of an exported model under the two runtimes of `amq.load_quantized`.

`dequantized` keeps each linear's dequantized weight after its first call; `packed` keeps only
the packed codes and dequantizes on every call. Both are loaded from the same directory in one
process and timed alternately (prefill of one window, then greedy decoding), so the ratios
compare like with like on a noisy machine. Both runtimes compute with the same weights, so their
outputs agree (bit for bit in the runs in docs/benchmarks.md; the JSON reports the difference).

    python scripts/bench_runtime.py outputs/search/runs/<time>/models/4.5
    python scripts/bench_runtime.py <model dir> --device cuda --window 2048 --decode 64
    python scripts/bench_runtime.py --block llama2-7b --device cuda --bits 3   # one decoder block's linears, random codes

`--block` needs no model: it times the seven linears of one decoder block of the named shapes
(random codes at `--bits`, group 128) for a one-token step and a `--window` prefill, which is
where the two runtimes differ; multiply by the number of blocks for a whole model.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from amq.quantizers.packed import RUNTIMES, PackedLinear, resident_bytes

log = logging.getLogger("bench_runtime")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes the PackedLinears hold: packed buffers plus any kept dequantized weight."""
    return sum(resident_bytes(m) for m in model.modules() if isinstance(m, PackedLinear))


def measure(model_dir: Path, runtime: str, tokens: torch.Tensor, decode: int, device: torch.device, compile: bool = False) -> dict:
    """Load under `runtime`, then memory after one forward, prefill and per-token decode times."""
    from amq.quantizers.export import load_quantized

    model = load_quantized(model_dir, device, runtime, compile and runtime == "packed")
    prompt = tokens[:, :16]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        logits = model(input_ids=tokens).logits[:, -1].float().cpu()
        prefill = _timed(lambda: model(input_ids=tokens), device)
        gen = lambda: model.generate(prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)  # noqa: E731
        decode_s = _timed(gen, device)
        generated = gen()[0, prompt.shape[1] :].tolist()
    out = {
        "resident_bytes": resident_bytes(model),
        "linear_bytes": linear_bytes(model),
        "prefill_s": prefill,
        "decode_s_per_token": decode_s / decode,
        "last_logits": logits,
        "generated": generated,
    }
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


BLOCK_SHAPES = {  # (out_features, in_features) of q, k, v, o, gate, up, down
    "llama2-7b": [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)],
}


def measure_block(shapes: list[tuple[int, int]], bits: int, runtime: str, window: int, repeats: int, device: torch.device, compile: bool = False) -> dict:
    """One block's PackedLinears under `runtime`: memory, a 1-token step and a `window`-token prefill."""
    from amq.quantizers.packed import GroupQuant, set_runtime

    g = torch.Generator().manual_seed(0)
    group = 128
    layers = torch.nn.ModuleList()
    for out_f, in_f in shapes:
        q = GroupQuant(
            torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8),
            (torch.rand(out_f, in_f // group, generator=g) * 1e-2).half(),
            torch.full((out_f, in_f // group), 2.0 ** (bits - 1)).half(),
            bits,
            group,
        )
        layers.append(PackedLinear.from_quant(q, None, torch.bfloat16))
    layers.to(device)
    set_runtime(layers, runtime, compile)
    xs = {n: torch.randn(1, n, 4096, device=device, dtype=torch.bfloat16) for n in (1, window)}

    def step(n: int) -> None:
        with torch.inference_mode():
            for layer, (out_f, in_f) in zip(layers, shapes):
                x = xs[n] if in_f == 4096 else torch.empty(1, n, in_f, device=device, dtype=torch.bfloat16)
                layer(x)

    step(1)  # first call: the dequantized runtime keeps its weights from here on (and compiling happens)
    step(window)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {n: statistics.median(_timed(lambda: step(n), device) for _ in range(repeats)) for n in (1, window)}
    out = {"resident_bytes": resident_bytes(layers), "step_s": times[1], "prefill_s": times[window]}
    if device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def main_block(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    shapes = BLOCK_SHAPES[args.block]
    res = {r: measure_block(shapes, args.bits, r, args.window, args.repeats, device, args.compile and r == "packed") for r in RUNTIMES}
    ratios = {k: res["packed"][k] / res["dequantized"][k] for k in res["packed"]}
    print(
        json.dumps(
            {
                "block": args.block,
                "bits": args.bits,
                "compile": args.compile,
                "device": str(device),
                "window": args.window,
                "runtimes": res,
                "packed_over_dequantized": ratios,
            },
            indent=2,
        )
    )
    print("\n| runtime | block MiB | 1-token step ms | prefill ms |\n| --- | --- | --- | --- |")
    for r in RUNTIMES:
        print(f"| {r} | {res[r]['resident_bytes'] / 2**20:.1f} | {1e3 * res[r]['step_s']:.3f} | {1e3 * res[r]['prefill_s']:.2f} |")
    print(f"| packed / dequantized | {ratios['resident_bytes']:.2f}x | {ratios['step_s']:.2f}x | {ratios['prefill_s']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, nargs="?", help="a model directory written by amq finalize (models/<target>)")
    ap.add_argument("--block", choices=sorted(BLOCK_SHAPES), default=None, help="time one synthetic decoder block instead of a model")
    ap.add_argument("--bits", type=int, default=3, help="code width of the synthetic block")
    ap.add_argument("--compile", action="store_true", help="the packed runtime dequantizes through torch.compile")
    ap.add_argument("--window", type=int, default=512, help="prefill length in tokens")
    ap.add_argument("--decode", type=int, default=32, help="greedy tokens generated")
    ap.add_argument("--repeats", type=int, default=3, help="alternating measurements per runtime (medians reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.block:
        return main_block(args)
    if args.model_dir is None:
        ap.error("give a model directory, or --block")
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    from amq.cli.evaluate import load_corpus
    from amq.llamacpp.build import default_cache_dir

    text = "\n\n".join(next(iter(load_corpus("wiki_lee", str(default_cache_dir())).load().heldout.values())))
    tokens = tokenizer(text, return_tensors="pt").input_ids[:, : args.window].to(device)
    runs: dict[str, list[dict]] = {r: [] for r in RUNTIMES}
    for i in range(args.repeats):
        for runtime in RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]:
            runs[runtime].append(measure(args.model_dir, runtime, tokens, args.decode, device, args.compile))
            log.info(
                "%s, repeat %d: prefill %.3fs, decode %.1f ms/token", runtime, i, runs[runtime][-1]["prefill_s"], 1e3 * runs[runtime][-1]["decode_s_per_token"]
            )
    first = {r: runs[r][0] for r in RUNTIMES}
    logit_diff = float((first["packed"]["last_logits"] - first["dequantized"]["last_logits"]).abs().max())
    same_tokens = first["packed"]["generated"] == first["dequantized"]["generated"]
    summary = {}
    for r in RUNTIMES:
        row = {k: first[r][k] for k in ("resident_bytes", "linear_bytes", "peak_gpu_bytes") if k in first[r]}
        row.update({k: statistics.median(x[k] for x in runs[r]) for k in ("prefill_s", "decode_s_per_token")})
        summary[r] = row
    p, d = summary["packed"], summary["dequantized"]
    ratios = {k: p[k] / d[k] for k in d if k in p}
    result = {
        "model_dir": str(args.model_dir),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "window": args.window,
        "decode_tokens": args.decode,
        "repeats": args.repeats,
        "max_abs_logit_diff": logit_diff,
        "same_tokens": same_tokens,
        "runtimes": summary,
        "packed_over_dequantized": ratios,
    }
    print(json.dumps(result, indent=2))
    print("\n| runtime | resident MiB | linears MiB | prefill s | decode ms/token |\n| --- | --- | --- | --- | --- |")
    for r in RUNTIMES:
        s = summary[r]
        print(f"| {r} | {s['resident_bytes'] / 2**20:.1f} | {s['linear_bytes'] / 2**20:.1f} | {s['prefill_s']:.3f} | {1e3 * s['decode_s_per_token']:.1f} |")
    print(
        f"| packed / dequantized | {ratios['resident_bytes']:.2f}x | {ratios['linear_bytes']:.2f}x | {ratios['prefill_s']:.2f}x | {ratios['decode_s_per_token']:.2f}x |"
    )
    if args.json:
        from amq.io import atomic_write_json

        atomic_write_json(args.json, result)
    if logit_diff or not same_tokens:
        log.warning(
            "the runtimes' outputs differ (max |logit difference| %.3g, same tokens: %s): the weights are the same, so this is bf16 matmul blocking",
            logit_diff,
            same_tokens,
        )


if __name__ == "__main__":
    main()
