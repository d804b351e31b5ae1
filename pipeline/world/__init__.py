"""Benchmark worlds written straight as embedding stores: the geoclip world (real photo locations,
embeddings from GeoCLIP's pretrained location encoder with per-record localizability)."""

__all__: list[str] = []
