"""MeKi ROM-backed LMs: model (model.py), corpus + tokenizer (data.py), training (train.py),
folding + ONNX export (export.py, fold.py)."""
