"""The compressed-tensors export of a real model, checked against amq: logits and perplexity.

The configured model (default: embedded SmolLM2, group size of its search space) gets a mixed
bit configuration (`--widths` in turn across its decoder linears), is quantized for real
by each quantizer, exported as amq does (`write_model_dir`), reloaded (`load_quantized`) and
converted (`write_compressed_tensors`). A fresh interpreter that never imports amq then loads
every converted directory with `AutoModelForCausalLM.from_pretrained` and scores the same
held-out windows; this prints the max |logit difference| to amq's model and both perplexities.

    python scripts/check_compressed_tensors.py
    python scripts/check_compressed_tensors.py model.source.dtype=float32 --windows 2

Quantizers: `int-zero` (amq's min-max grid with the zero point rounded to an integer, the GPTQ
reference's grid: exact in pack-quantized), `rtn` and `hqq` (amq's float zero points: exact in
naive-quantized, or rounded into pack-quantized with `round`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from amq.bits import BitConfig
from amq.config.compose import compose_config, load_model_and_data
from amq.evaluation.perplexity import PerplexityProtocol, perplexity_windows
from amq.quantizers.compressed_tensors import write_compressed_tensors
from amq.quantizers.export import directory_bytes, load_quantized, write_model_dir
from amq.quantizers.grid import GridForm, grouped, minmax_grid, rtn_quant, to_codes
from amq.quantizers.hqq import HQQFinalizer
from amq.quantizers.packed import GroupQuant, replace_linears

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("check_compressed_tensors")

# The plain-transformers side: no amq import, same scoring as `score` below.
LOADER = """
import json, math, sys, torch
from transformers import AutoModelForCausalLM
windows = torch.load(sys.argv[2])
out = {}
for d in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    nll, n, logits = 0.0, 0, []
    with torch.no_grad():
        for w in windows:
            lg = model(input_ids=w[None]).logits.float()
            nll += float(torch.nn.functional.cross_entropy(lg[0, :-1], w[1:], reduction="sum")); n += len(w) - 1
            logits.append(lg)
    torch.save(torch.cat(logits), d + "/logits.pt")
    out[d] = {"ppl": math.exp(nll / n), "dtype": str(model.dtype)}
assert not any(m == "amq" or m.startswith("amq.") for m in sys.modules)
print(json.dumps(out))
"""


def score(model: torch.nn.Module, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    nll, n, logits = 0.0, 0, []
    with torch.no_grad():
        for w in windows:
            lg = model(input_ids=w[None]).logits.float()
            nll += float(torch.nn.functional.cross_entropy(lg[0, :-1], w[1:], reduction="sum"))
            n += len(w) - 1
            logits.append(lg)
    return float(torch.tensor(nll / n).exp()), torch.cat(logits)


def integer_zero_quant(w: torch.Tensor, bits: int, group_size: int) -> GroupQuant:
    g = grouped(w.float(), group_size)
    scale, zero = minmax_grid(g, bits, form=GridForm(w.dtype))
    zero = zero.round()
    codes = to_codes(g, scale, zero, bits).reshape(w.shape).to(torch.uint8)
    return GroupQuant(codes, scale.half(), zero.half(), bits, group_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.source.dtype=float32")
    ap.add_argument("--widths", type=int, nargs="+", default=[3, 4, 8, 4, 2], help="bits of the linears, in turn")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows scored")
    ap.add_argument("--window", type=int, default=512, help="tokens per window")
    ap.add_argument("--quantizers", nargs="+", default=["int-zero", "rtn", "hqq"], choices=["int-zero", "rtn", "hqq"])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = compose_config(["logger=none", *args.overrides])
    md = load_model_and_data(cfg)  # threads, model, layout, text as amq-search loads them
    lm, layout, splits, group = md.lm, md.layout, md.splits, int(cfg.quantizer.group_size)
    model = lm.model
    protocol = PerplexityProtocol(args.window, args.windows, lm.add_bos).fit_to(model)
    windows = perplexity_windows(lm.tokenizer, next(iter(splits.heldout.values())), protocol)
    bits = {n: args.widths[i % len(args.widths)] for i, n in enumerate(layout.names)}
    unquantized_ppl, _ = score(model, windows)

    scratch = tempfile.TemporaryDirectory(prefix="amq-ct-")  # 3 GB of model directories; removed at exit, failed or not
    work = Path(scratch.name)
    torch.save(windows, work / "windows.pt")
    rows: dict[str, dict] = {}
    for kind in args.quantizers:
        if kind == "hqq":
            quants = HQQFinalizer().quantize(model, layout, bits, group)
        else:
            quant = rtn_quant if kind == "rtn" else integer_zero_quant
            quants = {n: quant(model.get_submodule(n).weight.detach(), b, group) for n, b in bits.items()}
        qmodel = copy.deepcopy(model)
        replace_linears(qmodel, quants, model.dtype)
        amq_dir = write_model_dir(work / f"{kind}-amq", qmodel, lm.tokenizer, BitConfig(bits, group), {"name": kind})
        del qmodel, quants
        reloaded = load_quantized(amq_dir)
        ppl, logits = score(reloaded, windows)
        for zero_points in ("exact",) if kind == "int-zero" else ("exact", "round"):
            out = write_compressed_tensors(reloaded, work / f"{kind}-{zero_points}", amq_dir, zero_points)
            groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
            rows[str(out)] = {
                "quantizer": kind,
                "zero_points": zero_points,
                "amq_ppl": ppl,
                "amq_logits": logits,
                "formats": sorted({g["format"] for g in groups.values()}),
                "amq_mib": directory_bytes(amq_dir) / 2**20,
                "ct_mib": directory_bytes(out) / 2**20,
            }
        del reloaded

    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(list(rows)), str(work / "windows.pt")], capture_output=True, text=True, cwd=work)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"model {lm.name}, {model.dtype}, group {group}, widths {sorted(set(args.widths))} over {len(bits)} linears, "
        f"{len(windows)} windows x {windows.shape[1]} tokens; unquantized ppl {unquantized_ppl:.3f}"
    )
    print("| quantizer | zero points | format | amq ppl | transformers ppl | max abs logit diff | max abs logit | amq MiB | c-t MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for d, r in rows.items():
        ct_logits = torch.load(Path(d) / "logits.pt")
        diff = float((ct_logits - r["amq_logits"]).abs().max())
        row = {k: v for k, v in r.items() if k != "amq_logits"} | {
            "ct_ppl": loaded[d]["ppl"],
            "ct_dtype": loaded[d]["dtype"],
            "max_abs_logit_diff": diff,
            "max_abs_logit": float(r["amq_logits"].abs().max()),
        }
        results.append(row)
        print(
            f"| {r['quantizer']} | {r['zero_points']} | {', '.join(r['formats'])} | {r['amq_ppl']:.3f} | {row['ct_ppl']:.3f} "
            f"| {diff:.4g} | {row['max_abs_logit']:.3g} | {r['amq_mib']:.1f} | {r['ct_mib']:.1f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"model": lm.name, "dtype": str(model.dtype), "group_size": group, "unquantized_ppl": unquantized_ppl, "rows": results}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
