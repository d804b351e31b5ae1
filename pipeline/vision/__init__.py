"""Frozen image backbones: open_clip models, the tiny test model and foreign vision towers (DINOv2, StreetCLIP)."""

__all__: list[str] = []
