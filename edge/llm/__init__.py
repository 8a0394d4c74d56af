"""On-device runtime for `llm` bundles: onnxruntime decoding with a flash-resident MeKi table.

Never imports torch: `edge.llm.runtime.LlmRuntime` loads a bundle, memory-maps its table and
decodes with a KV cache; `edge.llm.bench` compares bundles side by side.
"""
