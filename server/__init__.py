"""The policy server: gRPC servicer, dynamic batcher, onnxruntime heads. Never imports torch or edge."""
