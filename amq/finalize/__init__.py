"""From a searched bit configuration to a real quantized model: final quantizers and packed layers."""
