"""Time GPTQ and AWQ per decoder block on a model of a published shape (random weights).

Timing does not depend on the weight values, so a Llama-2-7B-shaped model built from its
architecture config with random weights stands in for the real one (no download). Only the first
`--layers` blocks are built; the whole model's time is about `n_blocks x` the per-block time.

    python scripts/bench_finalizers_scale.py --layers 2 --samples 128 --seq-len 2048     # on a GPU
    python scripts/bench_finalizers_scale.py --layers 1 --samples 4 --seq-len 512        # CPU check

Needs only torch and transformers (no Hydra, no hqq), so it runs where those are all there is.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from amq.modeling.discovery import discover_layout
from amq.quantizers.awq import AWQFinalizer
from amq.quantizers.gptq import GPTQFinalizer

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA2_7B, num_hidden_layers=args.layers)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
    layout = discover_layout(model)
    calib = torch.randint(0, config.vocab_size, (args.samples, args.seq_len))
    bits = {li.name: args.bits for li in layout.linears}
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}", "shape": "Llama-2-7B", **vars(args)}
    res.pop("json")
    finalizers = {  # GPTQ as configured (with its range search) and with plain min-max grids
        "gptq": GPTQFinalizer(batch_size=args.batch_size),
        "gptq_minmax": GPTQFinalizer(batch_size=args.batch_size, clip_search=False),
        "awq": AWQFinalizer(batch_size=args.batch_size),
    }
    for label, fz in finalizers.items():
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fz.quantize(model, layout, bits, args.group_size, calib)
        if device.type == "cuda":
            torch.cuda.synchronize()
            res[f"{label}_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res[f"{label}_s_per_block"] = round((time.perf_counter() - t0) / args.layers, 2)
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
