"""The README cites the two works the project implements (the paper, the thesis), and says which
statistics come from which library (item 8 of issue 19)."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _references() -> str:
    m = re.search(r"^## References\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert m, "README has no '## References' section"
    return " ".join(m.group(1).split())


def test_plonk_paper_is_cited():
    refs = _references()
    assert "Around the World in 80 Timesteps: A Generative Approach to Global Visual Geolocation" in refs
    assert all(name in refs for name in ("Nicolas Dufour", "David Picard", "Vicky Kalogeiton", "Loic Landrieu"))
    assert "CVPR 2025" in refs and "2412.06781" in refs


def test_thesis_is_cited():
    refs = _references()
    assert ("Understanding and Enhancing Visual Place Recognition through Embedding Space Interpretability and "
            "Uncertainty Estimation") in refs
    assert "Davide Sferrazza" in refs and "Politecnico di Torino" in refs and "2025" in refs


def test_the_paper_and_the_thesis_point_at_the_references():
    intro = README.split("## ", 1)[0]
    assert "[[1]](#references)" in intro and "[[2]](#references)" in intro


def test_statistics_libraries_are_named():
    refs = _references()
    assert "scikit-learn" in refs and "scipy" in refs and "RidgeCV" in refs
