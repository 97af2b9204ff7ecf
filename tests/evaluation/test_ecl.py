"""calibrate-ecl: the per-layer entropy curve and the proposed collapse layer."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import inputs, mixed_specs, model_for

from vtprune.ecl import entropy_curve, propose_collapse_layer
from vtprune.ops.entropy import matrix_entropy


def test_set_entropy_equals_brute_force_covariance_spectrum():
    torch.manual_seed(0)
    x = torch.randn(12, 40, dtype=torch.float64) @ torch.randn(40, 40, dtype=torch.float64)
    r = x - x.mean(0)
    lam = torch.linalg.eigvalsh(r.T @ r / 12)  # D x D covariance: same non-zero spectrum as the dual
    lam = lam[lam > 1e-9]
    lam = lam / lam.sum()
    want = float(-(lam * lam.log()).sum() / math.log(12))
    assert float(matrix_entropy(x[None], normalize="trace")[0]) == pytest.approx(want, rel=1e-8)


def test_proposed_layer_is_the_sharpest_drop():
    assert propose_collapse_layer([0.9, 0.85, 0.4, 0.38, 0.1]) == 2  # drops 0.05, 0.45, 0.02 (last point excluded)
    assert propose_collapse_layer([0.5, 0.3, 0.1, 0.0]) == 1  # tie: the earliest
    with pytest.raises(ValueError, match="at least 3"):
        propose_collapse_layer([0.1, 0.2])


def test_curve_on_every_family(family):
    model = model_for(family, "sdpa")
    curve = entropy_curve(model, inputs(model, mixed_specs(family)))
    assert len(curve) == model.config.text_config.num_hidden_layers + 1
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in curve)
    assert 1 <= propose_collapse_layer(curve) < len(curve) - 1
