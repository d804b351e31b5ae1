"""Plumbing with no domain knowledge: errors, devices, provenance, atomic file I/O, locks."""

__all__: list[str] = []
