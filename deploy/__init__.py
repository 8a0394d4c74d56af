"""Deployment tooling: link profiles and emulation, bundling, flashing, measurement."""
