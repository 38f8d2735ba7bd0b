"""Weight quantizers and the formats of their results.

One protocol family (`base.py`): the proxy quantizer the search swaps in (`hqq_proxy`, returning
dequantized weights) and the final quantizers of exported models (`hqq`, `gptq`, `awq`, returning
packed `GroupQuant`s), with their shared grid and calibration helpers. `packed` is the packed
layer format, `export` writes and reads an exported model directory (`load_quantized`), and
`llamacpp` maps a bit configuration to llama.cpp tensor types.
"""
