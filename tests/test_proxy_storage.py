"""`packed` storage (float16 scale/zero, dequantized on swap) loads the same weights as `dequantized`."""

from __future__ import annotations

import pytest
import torch

from amq.modeling.discovery import discover_layout
from amq.modeling.random_init import random_llama
from amq.proxy.bank import ProxyBank
from amq.quantizers.hqq_proxy import HQQQuantizer


def _bank(storage: str, device: str = "cpu") -> ProxyBank:
    torch.manual_seed(0)
    model = random_llama("tiny", device)
    quantizer = HQQQuantizer(group_size=128, storage=storage)
    return ProxyBank(model, discover_layout(model), quantizer, [2, 3, 4], storage=storage).build(None, "tiny")


def test_packed_and_dequantized_swap_in_the_same_weights():
    packed, dense = _bank("packed"), _bank("dequantized")
    names = packed.layout.names
    config = {n: (2, 3, 4)[i % 3] for i, n in enumerate(names)}
    packed.apply(config), dense.apply(config)
    for n in names:
        a, b = packed.modules[n].weight.float(), dense.modules[n].weight.float()
        # float16 scale/zero move a value by at most ~2**-11 of itself (plus 2**-11 of the zero point's
        # share near zero), which can flip its bf16 rounding: one bf16 step apart at most
        assert torch.allclose(a, b, rtol=2**-7, atol=2**-10 * float(b.abs().max())), n
        assert (a != b).float().mean() < 0.3, n
    assert packed.memory_bytes() < dense.memory_bytes() / 2
    packed.restore(), dense.restore()
    for n in names:
        assert torch.equal(packed.modules[n].weight, dense.modules[n].weight), n


def test_a_linears_weight_at_a_width_is_what_a_swap_loads_without_swapping():
    """`ProxyBank.weight` (the output-error pass reads every width of a linear this way) gives the
    weight `apply` would load, in either storage, and leaves the model as it was."""
    for storage in ("packed", "dequantized"):
        bank = _bank(storage)
        name = bank.layout.names[1]
        before = bank.modules[name].weight.detach().clone()
        for bits in (2, 3, 4):
            got = bank.weight(name, bits)
            bank.apply({name: bits})
            assert torch.equal(got, bank.modules[name].weight), (storage, bits)
            bank.restore()
        assert torch.equal(bank.weight(name, None), before) and torch.equal(bank.modules[name].weight, before)
        with pytest.raises(KeyError, match="8-bit is not in the proxy bank"):
            bank.weight(name, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_swaps_match_eager_dequantization_on_cuda():
    fused, eager = _bank("packed", "cuda"), _bank("packed", "cuda")
    eager.fused_swaps = False
    names = fused.layout.names
    for shift in range(3):
        config = {n: (2, 3, 4)[(i + shift) % 3] for i, n in enumerate(names)}
        fused.apply(config), eager.apply(config)
        for n in names:
            a, b = fused.modules[n].weight.float(), eager.modules[n].weight.float()
            assert torch.allclose(a, b, rtol=2**-7, atol=2**-10 * float(b.abs().max())), n
    assert fused.fused_swaps, "the compiled path fell back to eager"
