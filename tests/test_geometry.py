"""The box-relation geometry against ORT's conventions and the pinned case."""
import math

import pytest
import torch

from geocap.kernels import box_relation_embedding, geometry_log_bias
from geocap.kernels.geometry import box_displacement, geometry_frequencies
from geocap.kernels.reference import eager_geometry_log_bias
from helpers import assert_within_eager_rule, random_boxes

PINNED = torch.tensor([[[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.4]]], dtype=torch.float64)


def test_pinned_displacement():
    d = box_displacement(PINNED)[0]
    torch.testing.assert_close(d[0, 1], torch.tensor([-1.540445, -2.233592, -0.133531, 0.074108], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(d[1, 0], torch.tensor([-1.673976, -2.159484, 0.133531, -0.074108], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    diag = torch.tensor([math.log(1e-3), math.log(1e-3), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(d[0, 0], diag)
    torch.testing.assert_close(d[1, 1], diag)


def test_embedding_channel_order_matches_ort():
    """[sin(dx f0..f7), sin(dy ..), sin(dw ..), sin(dh ..), cos(dx ..), ..., cos(dh ..)], args 100 * disp * f."""
    emb = box_relation_embedding(PINNED)[0, 0, 1]
    disp = box_displacement(PINNED)[0, 0, 1]
    freqs = [1000.0 ** (-k / 8) for k in range(8)]
    expected = [math.sin(100 * disp[c].item() * f) for c in range(4) for f in freqs]
    expected += [math.cos(100 * disp[c].item() * f) for c in range(4) for f in freqs]
    torch.testing.assert_close(emb, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert box_relation_embedding(PINNED, dim_g=16).shape == (1, 2, 2, 16)


def test_frequencies():
    torch.testing.assert_close(geometry_frequencies(dtype=torch.float64),
                               torch.tensor([1000.0 ** (-k / 8) for k in range(8)], dtype=torch.float64))
    with pytest.raises(ValueError, match="dim_g"):
        geometry_frequencies(12)


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_separable_log_bias_equals_full_embedding(n):
    g = torch.Generator().manual_seed(n)
    boxes = random_boxes(3, n, generator=g, dtype=torch.float64)
    w = torch.randn(4, 64, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(4, generator=g, dtype=torch.float64) * 0.3
    ours = geometry_log_bias(boxes, w, b)
    ref = eager_geometry_log_bias(boxes, w, b)
    assert ours.shape == (3, 4, n, n)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)


def test_float32_log_bias_within_eager_rule():
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(2, 30, generator=g)
    w, b = torch.randn(8, 64, generator=g) * 0.3, torch.randn(8, generator=g) * 0.3
    ref = eager_geometry_log_bias(boxes.double(), w.double(), b.double())
    # uncapped: near the clamp, log(x) is ill-conditioned past any fixed fraction of |log 1e-6|,
    # eager included (6.9e-2 of 13.8 here); the attention results it feeds are capped
    assert_within_eager_rule("log bias", geometry_log_bias(boxes, w, b), eager_geometry_log_bias(boxes, w, b), ref,
                             torch.float32, capped=False)


def test_degenerate_and_identical_boxes_are_finite():
    boxes = torch.tensor([[[0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]])
    assert torch.isfinite(box_relation_embedding(boxes)).all()
    assert torch.isfinite(geometry_log_bias(boxes, torch.randn(2, 64), torch.randn(2))).all()


def test_geometry_log_bias_input_errors():
    boxes = random_boxes(1, 3)
    with pytest.raises(ValueError, match=r"wg_weight must have shape \[H, 64\]"):
        geometry_log_bias(boxes, torch.randn(64), torch.randn(1))
    with pytest.raises(ValueError, match=r"wg_bias must have shape \[H\] = \(2,\)"):
        geometry_log_bias(boxes, torch.randn(2, 64), torch.randn(3))
    with pytest.raises(ValueError, match="normalised"):
        geometry_log_bias(boxes * 100, torch.randn(2, 64), torch.randn(2))


def test_block_log_bias_gradients_match_finite_differences():
    from geocap.kernels.geometry import BoxFactors, block_log_bias

    g = torch.Generator().manual_seed(4)
    boxes = random_boxes(2, 11, generator=g, dtype=torch.float64)
    w = (torch.randn(3, 64, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = (torch.randn(3, generator=g, dtype=torch.float64) * 0.3 + 0.5).requires_grad_()
    f = BoxFactors(boxes, torch.float64)
    assert torch.autograd.gradcheck(lambda w, b: block_log_bias(f.rows(3, 9), f, w, b), (w, b))
