"""Bridges from other libraries' models to the fused ops (optional dependencies, imported on use)."""
