"""The box-relation geometry against ORT's conventions and the pinned case."""
import math

import pytest
import torch

from geocap.kernels import box_relation_embedding, geometry_log_bias
from geocap.kernels.geometry import box_displacement, center_offset, geometry_frequencies
from geocap.kernels.reference import eager_geometry_log_bias
from helpers import assert_within_eager_rule, dyadic_boxes, mirrored_boxes, random_boxes

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


@pytest.mark.parametrize("embedding", ["ort", "signed"])
@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_separable_log_bias_equals_full_embedding(n, embedding):
    g = torch.Generator().manual_seed(n)
    boxes = random_boxes(3, n, generator=g, dtype=torch.float64)
    w = torch.randn(4, 64, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(4, generator=g, dtype=torch.float64) * 0.3
    ours = geometry_log_bias(boxes, w, b, embedding=embedding)
    ref = eager_geometry_log_bias(boxes, w, b, embedding)
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


@pytest.mark.parametrize("embedding", ["ort", "signed"])
def test_block_log_bias_gradients_match_finite_differences(embedding):
    from geocap.kernels.geometry import BoxFactors, block_log_bias

    g = torch.Generator().manual_seed(4)
    boxes = random_boxes(2, 11, generator=g, dtype=torch.float64)
    w = (torch.randn(3, 64, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b = (torch.randn(3, generator=g, dtype=torch.float64) * 0.3 + 0.5).requires_grad_()
    f = BoxFactors(boxes, torch.float64, embedding)
    assert torch.autograd.gradcheck(lambda w, b: block_log_bias(f.rows(3, 9), f, w, b), (w, b))


def test_pinned_signed_displacement():
    """embedding="signed": dx = asinh((cx_i - cx_j) / (2e-3 w_i)), dy likewise; dw, dh as ORT's."""
    d = box_displacement(PINNED, "signed")[0]
    ort = box_displacement(PINNED)[0]
    cx, cy, w, h = (0.3, 0.6), (0.4, 0.25), (1.4, 1.6), (1.4, 1.3)        # by hand from PINNED
    for i, j in [(0, 1), (1, 0)]:
        expected = [math.asinh((cx[i] - cx[j]) / (2e-3 * w[i])), math.asinh((cy[i] - cy[j]) / (2e-3 * h[i]))]
        torch.testing.assert_close(d[i, j, :2], torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(d[i, j, 2:], ort[i, j, 2:], atol=0, rtol=0)
    assert d[0, 1, 0] < 0 < d[1, 0, 0] and d[0, 1, 1] > 0 > d[1, 0, 1]
    torch.testing.assert_close(d[0, 0], torch.zeros(4, dtype=torch.float64), atol=0, rtol=0)


def test_signed_offset_is_orts_log_with_its_sign_away_from_zero():
    """For |u| >> 1e-3 the signed dx is sign(u) (ORT's dx - log 1e-3); its range matches ORT's."""
    u = torch.tensor([-1.02, -0.5, -0.05, 0.05, 0.5, 1.02], dtype=torch.float64)
    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    signed = center_offset(u[None], one.expand(1, 6), zero, "signed")[0, :, 0]
    ort = center_offset(u[None], one.expand(1, 6), zero, "ort")[0, :, 0]
    gap = (signed - torch.sign(u) * (ort - math.log(1e-3))).abs()
    assert (gap <= (1e-3 / u) ** 2).all() and gap.max() > 0        # asinh z - log 2z = 1 / (4 z^2) + ...
    # the largest offset boxes within BOX_SLACK of [0, 1] allow: |100 dx| stays where sincos is accurate
    assert 100 * signed.abs().max() < 693 and 100 * ort.abs().max() < 691.0


def test_mirroring_keeps_the_ort_bias_and_changes_the_signed_one():
    g = torch.Generator().manual_seed(3)
    boxes = dyadic_boxes(2, 9, seed=3)
    w, b = torch.randn(4, 64, generator=g) * 0.3, torch.randn(4, generator=g) * 0.3 + 0.5
    for bias_of in (geometry_log_bias, eager_geometry_log_bias):
        assert torch.equal(bias_of(boxes, w, b, embedding="ort"), bias_of(mirrored_boxes(boxes), w, b, embedding="ort"))
        signed = bias_of(boxes, w, b, embedding="signed")
        mirrored = bias_of(mirrored_boxes(boxes), w, b, embedding="signed")
        assert (signed - mirrored).abs().max() > 0.1 * signed.abs().max()
    # the mirror image negates exactly the signed dx and nothing else
    d, m = box_displacement(boxes.double(), "signed"), box_displacement(mirrored_boxes(boxes).double(), "signed")
    assert torch.equal(m[..., 0], -d[..., 0]) and torch.equal(m[..., 1:], d[..., 1:])


def test_unknown_embedding_is_refused():
    boxes = random_boxes(1, 3)
    with pytest.raises(ValueError, match="embedding must be one of 'ort', 'signed', got 'mirror'"):
        geometry_log_bias(boxes, torch.randn(2, 64), torch.randn(2), embedding="mirror")
    with pytest.raises(ValueError, match="embedding must be one of"):
        box_relation_embedding(boxes, embedding=None)
