"""MethodBase is an abstract interface: every registered family implements it, a family that
misses part of it cannot be built."""

from __future__ import annotations

import pytest

from geopipe.pipeline.methods.base import MethodBase
from geopipe.pipeline.methods.registry import METHODS, get_method


def test_every_registered_method_implements_the_interface():
    for name, cls in METHODS.items():
        assert issubclass(cls, MethodBase) and not cls.__abstractmethods__, name
        assert isinstance(get_method(name), MethodBase)


def test_a_family_missing_part_of_the_interface_cannot_be_built():
    with pytest.raises(TypeError, match="abstract"):
        MethodBase()

    class NoLikelihood(MethodBase):
        def build_model(self, net_cfg):
            return None

        def loss(self, model, x, cond, *, generator=None):
            return x.sum()

        def predict_point(self, model, cond, **kw):
            return cond

        def sample(self, model, cond, n, **kw):
            return cond

    with pytest.raises(TypeError, match="log_likelihood"):
        NoLikelihood()
