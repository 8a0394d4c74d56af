"""splitedge: edge-deployment SDK for split RL policies and ROM-backed LLMs."""

__version__ = "0.1.0"
