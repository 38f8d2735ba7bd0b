"""The quantization proxy: every searchable linear quantized once per candidate bit width."""
