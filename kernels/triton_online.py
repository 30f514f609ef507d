"""Streaming softmax with an entropy accumulator: the Triton building block that the
geometry-attention kernel and the entropy kernel share.

Per row the running state is ``m`` (max logit so far), ``l = sum exp(s - m)`` and
``t = sum exp(s - m) * (s - m)``. Keeping ``t`` relative to ``m`` avoids the cancellation of
``logsumexp(s) - E[s]`` when logits are large. At the end:

    lse     = m + log(l)
    entropy = log(l) - t / l          (nats; 0 for a row with one valid entry)

Invalid entries (padding, causal future, out of range) contribute nothing. ``m`` starts at
``NEG_INIT``, a finite stand-in for -inf, so a tile with no valid entry never makes NaNs.
"""
import triton
import triton.language as tl

NEG_INIT = tl.constexpr(-1.0e30)


@triton.jit
def online_softmax_step(m_i, l_i, t_i, s, valid, WITH_ENTROPY: tl.constexpr = True):
    """Fold one ``[BM, BN]`` tile of fp32 logits ``s`` (entries where ``valid``) into the row state.

    Returns ``(m_new, alpha, p, l_new, t_new)``: ``alpha = exp(m_i - m_new)`` rescales anything
    accumulated before this tile (``P @ V`` in attention), ``p = exp(s - m_new)`` (0 where invalid).
    Without ``WITH_ENTROPY`` the entropy accumulator ``t`` is passed through untouched (no cost).
    """
    s_valid = tl.where(valid, s, NEG_INIT)
    m_new = tl.maximum(m_i, tl.max(s_valid, 1))
    alpha = tl.exp(m_i - m_new)
    shifted = s_valid - m_new[:, None]
    p = tl.where(valid, tl.exp(shifted), 0.0)
    l_new = l_i * alpha + tl.sum(p, 1)
    t_new = t_i
    if WITH_ENTROPY:
        t_new = alpha * (t_i + l_i * (m_i - m_new)) + tl.sum(tl.where(valid, p * shifted, 0.0), 1)
    return m_new, alpha, p, l_new, t_new


@triton.jit
def online_softmax_finish(m_i, l_i, t_i):
    """Return ``(lse, entropy)`` per row; rows without valid entries get lse = +inf-like and entropy 0."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, -NEG_INIT, m_i + tl.log(l_safe))
    entropy = tl.where(empty, 0.0, tl.log(l_safe) - t_i / l_safe)
    return lse, entropy
