"""From a searched front to real quantized models: selection, final quantizers, export, reload."""
