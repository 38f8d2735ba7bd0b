"""The finalize stage: from a searched archive to real quantized models, evaluated and exported.

`selection` picks the archived configuration for each budget, `settings` holds what the stage
exports and measures, `stage` quantizes, evaluates and writes `models/<target>/`, and `model_card`
renders each model's README. The quantizers and formats themselves live in `amq.quantizers`.
"""
