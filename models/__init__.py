"""Offline work: torch models, SB3 training, exporters. Nothing imports this at run time."""
