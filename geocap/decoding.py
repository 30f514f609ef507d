"""Caption decoding for :class:`~geocap.model.ObjectRelationTransformer`: greedy, beam search and
sampling (for self-critical training).

All three run every image (and every beam or sample) as one batch through
:meth:`~geocap.model.ObjectRelationTransformer.decode_step`, one token per step over the model's
key/value cache, so the prefix is never re-decoded. They take the :class:`~geocap.model.Memory`
from :meth:`~geocap.model.ObjectRelationTransformer.encode` (``B`` images) and return a
:class:`Decoded`.

Conventions shared by the three:

* Decoding starts from ``config.bos_id``; the returned tokens are the generated ones only (no
  <bos>). A row ends at ``config.eos_id``, which is kept in ``tokens`` and counted in
  ``lengths``; after the end a row holds ``config.pad_id`` and its log-probability 0.
* ``max_len`` is the most tokens generated per row, <eos> included: a caption that has not ended
  after ``max_len`` tokens is cut there (``max_len`` words, no <eos>). So ``tokens.shape[1] <=
  max_len``, and the decoder sees at most ``max_len`` positions (``<= config.max_len``).
* <pad> and <bos> are never generated (they are not words; a trained model gives them ~0
  probability anyway): they are excluded when choosing (argmax, top-k, sampling), unless they
  are the <eos> id too (ORT's vocabulary: one id 0 for padding, start and end, so nothing is
  excluded and choosing 0 ends the caption). The scores and
  log-probabilities returned are nevertheless the model's own ``log_softmax`` over the whole
  vocabulary, i.e. what teacher forcing on the returned tokens gives.
* Decoding stops as soon as every row has ended.
* The model's train/eval mode is left as the caller set it; call ``model.eval()`` first for
  deterministic decoding (dropout). ``backend`` is passed on to ``decode_step``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from geocap.model import DecoderCache, Memory, ObjectRelationTransformer

__all__ = ["Decoded", "beam_search", "greedy_decode", "length_penalty_factor", "sample"]


@dataclass
class Decoded:
    """Decoded captions, one row per caption (``R`` rows: ``B`` images, or ``B * n`` samples
    image-major). ``T`` is the longest caption's length, at most ``max_len``.

    ``tokens`` LongTensor ``[R, T]``: generated ids without <bos>, <eos> where produced, <pad> after.
    ``lengths`` LongTensor ``[R]``: tokens up to and including <eos> (``max_len`` if cut).
    ``scores`` float ``[R]``: the sum of the tokens' log-probabilities; for :func:`beam_search`
    divided by :func:`length_penalty_factor` (identical when ``length_penalty=0``).
    ``token_log_probs`` float ``[R, T]`` or None: each token's log-probability, 0 after the end
    (from :func:`sample` it carries the autograd graph).
    ``baseline``: for :func:`sample` with ``greedy_baseline=True``, the greedy captions of the
    ``B`` images (one row per image, no graph), else None.
    ``eos_id``: the model's <eos> id, for :meth:`to_lists`.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    token_log_probs: Optional[torch.Tensor] = None
    baseline: Optional["Decoded"] = None
    eos_id: Optional[int] = None

    @property
    def mask(self) -> torch.Tensor:
        """BoolTensor ``[R, T]``: True at the valid tokens (words and <eos>), False at padding."""
        steps = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return steps[None, :] < self.lengths[:, None]

    def to_lists(self) -> list[list[int]]:
        """The captions as lists of word ids: each row up to its length, without the final <eos>
        (rows cut at ``max_len`` keep all their words)."""
        out = []
        for row, length in zip(self.tokens.tolist(), self.lengths.tolist()):
            words = row[:length]
            if self.eos_id is not None and words and words[-1] == self.eos_id:
                words = words[:-1]
            out.append(words)
        return out


def length_penalty_factor(length: torch.Tensor | int, alpha: float) -> torch.Tensor | float:
    """GNMT's length penalty ``((5 + length) / 6) ** alpha`` (Wu et al. 2016), ``length`` counting
    <eos>. A beam's score is its summed log-probability divided by this; ``alpha = 0`` gives 1
    (plain sum), larger ``alpha`` favours longer captions."""
    return ((5 + length) / 6) ** alpha


# -- shared helpers -------------------------------------------------------------------------
def _check(model: ObjectRelationTransformer, memory: Memory, max_len: int) -> None:
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if max_len > model.config.max_len:
        raise ValueError(f"max_len = {max_len} exceeds the model's positions (config.max_len = {model.config.max_len})")
    if memory.batch_size < 1:
        raise ValueError("memory holds no image")


def _forbidden(model: ObjectRelationTransformer, device: torch.device) -> torch.Tensor:
    """The ids never generated: <pad> and <bos> (unless one of them is also <eos>)."""
    cfg = model.config
    ids = sorted({cfg.pad_id, cfg.bos_id} - {cfg.eos_id})
    return torch.tensor(ids, dtype=torch.long, device=device)


def _mask_forbidden(log_probs: torch.Tensor, forbidden: torch.Tensor) -> torch.Tensor:
    return log_probs.index_fill(-1, forbidden, float("-inf"))


def _step_loop(model, memory, max_len, choose, backend) -> Decoded:
    """Run ``memory.batch_size`` rows one token at a time; ``choose(log_probs [R, V] with the
    forbidden ids at -inf) -> [R]`` picks each row's next token. Ended rows get <pad> and 0."""
    cfg = model.config
    rows, device = memory.batch_size, memory.states.device
    forbidden = _forbidden(model, device)
    token = torch.full((rows,), cfg.bos_id, dtype=torch.long, device=device)
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    tokens, token_lps = [], []
    cache: Optional[DecoderCache] = None
    for _ in range(max_len):
        log_probs, cache = model.decode_step(memory, token, cache, backend=backend)
        chosen = choose(_mask_forbidden(log_probs, forbidden))
        token = torch.where(alive, chosen, torch.full_like(chosen, cfg.pad_id))
        lp = log_probs.gather(1, chosen[:, None]).squeeze(1)
        token_lps.append(torch.where(alive, lp, torch.zeros_like(lp)))
        tokens.append(token)
        lengths = lengths + alive.long()
        alive = alive & (token != cfg.eos_id)
        if not bool(alive.any()):
            break
    token_log_probs = torch.stack(token_lps, dim=1)
    return Decoded(torch.stack(tokens, dim=1), lengths, token_log_probs.sum(1), token_log_probs, eos_id=cfg.eos_id)


# -- greedy ---------------------------------------------------------------------------------
def greedy_decode(model: ObjectRelationTransformer, memory: Memory, *, max_len: int = 20,
                  backend: Optional[str] = None) -> Decoded:
    """The most likely next token at every step, for the ``B`` images of ``memory``.

    Returns a :class:`Decoded` with ``B`` rows; ``scores`` the summed log-probability,
    ``token_log_probs`` filled. Runs under ``torch.no_grad()``.
    """
    _check(model, memory, max_len)
    with torch.no_grad():
        return _step_loop(model, memory, max_len, lambda lp: lp.argmax(-1), backend)


# -- sampling -------------------------------------------------------------------------------
def sample(model: ObjectRelationTransformer, memory: Memory, *, n: int = 5, max_len: int = 20,
           temperature: float = 1.0, greedy_baseline: bool = False,
           backend: Optional[str] = None) -> Decoded:
    """``n`` captions per image drawn from the model, for self-critical training.

    Rows are image-major: image i's samples are rows ``i * n .. i * n + n - 1`` (``B * n`` rows).
    Each token is drawn from ``softmax(log_probs / temperature)`` over the allowed ids (uses
    torch's global RNG, so ``torch.manual_seed`` makes it reproducible); ``temperature -> 0``
    tends to greedy. ``token_log_probs [B * n, T]`` are the model's log-probabilities of the drawn
    tokens at temperature 1 (the policy SCST differentiates), 0 after the end, and keep the
    autograd graph (unless called under ``no_grad``); ``Decoded.mask`` marks the valid tokens
    and ``scores`` is their sum.

    ``greedy_baseline=True`` also fills ``Decoded.baseline`` with :func:`greedy_decode` of the
    ``B`` images, run in eval mode without gradients (the model's mode is restored afterwards).
    """
    _check(model, memory, max_len)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")

    def choose(log_probs: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(log_probs.detach().float() / temperature, dim=-1)
        return torch.multinomial(probs, 1).squeeze(1)

    out = _step_loop(model, memory.repeat_interleave(n), max_len, choose, backend)
    if greedy_baseline:
        was_training = model.training
        model.eval()
        try:
            out.baseline = greedy_decode(model, memory, max_len=max_len, backend=backend)
        finally:
            model.train(was_training)
    return out


# -- beam search ----------------------------------------------------------------------------
def beam_search(model: ObjectRelationTransformer, memory: Memory, *, beam_size: int = 3, max_len: int = 20,
                length_penalty: float = 0.0, backend: Optional[str] = None) -> Decoded:
    """Beam search: the best caption per image among ``beam_size`` hypotheses kept per step.

    All ``B * beam_size`` beams run as one batch (row ``i * beam_size + k`` is image i's beam k);
    after each step the cache rows are reordered with ``DecoderCache.index_select`` to follow
    the surviving beams. At step 0 only beam 0 of each image is live (the others start at
    -inf), so no image holds duplicate beams. Each step takes the ``2 * beam_size`` best
    extensions per image: those of the best ``beam_size`` that end in <eos> (or reach ``max_len``
    tokens) go to the image's pool of finished captions, and the best ``beam_size`` extensions
    that do not end stay live (so the beam stays full; there are enough among ``2 * beam_size``,
    since each beam contributes one <eos> at most). With ``beam_size=1`` this is exactly greedy
    decoding when ``length_penalty=0``. A caption's score
    is its summed log-probability divided by :func:`length_penalty_factor` ``(length,
    length_penalty)`` (GNMT; ``length`` counts <eos>; ``length_penalty = 0``: the plain sum).
    An image stops once no live beam can still beat its best finished caption (exact for any
    ``length_penalty``, since log-probabilities are <= 0); the search stops when all have.

    Returns a :class:`Decoded` with ``B`` rows, each image's best finished caption: ``scores``
    the penalised score, ``token_log_probs`` its tokens' log-probabilities (their sum is the
    unpenalised score). Runs under ``torch.no_grad()``.

    Like any beam search it is not exact: a higher-scoring caption can fall out of the beam
    (rarely, even the greedy one), and the pool keeps only each image's best caption.
    """
    _check(model, memory, max_len)
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    alpha = float(length_penalty)
    with torch.no_grad():
        return _beam_search(model, memory, beam_size, max_len, alpha, backend)


def _beam_search(model, memory, k, max_len, alpha, backend) -> Decoded:
    cfg = model.config
    b, device = memory.batch_size, memory.states.device
    v = cfg.vocab_size
    forbidden = _forbidden(model, device)
    neg_inf = float("-inf")
    memory = memory.repeat_interleave(k)
    image_base = (torch.arange(b, device=device) * k)[:, None]  # [B, 1] first row of each image

    # live beams: raw summed log-prob [B, K]; history of tokens and log-probs [B * K, t]
    live = torch.full((b, k), neg_inf, device=device)
    live[:, 0] = 0.0
    hist_tokens = torch.zeros(b * k, 0, dtype=torch.long, device=device)
    hist_lps = torch.zeros(b * k, 0, device=device)
    # pool: the best finished caption per image (penalised score, tokens, log-probs, length)
    best = torch.full((b,), neg_inf, device=device)
    best_tokens = torch.full((b, max_len), cfg.pad_id, dtype=torch.long, device=device)
    best_lps = torch.zeros(b, max_len, device=device)
    best_len = torch.zeros(b, dtype=torch.long, device=device)

    token = torch.full((b * k,), cfg.bos_id, dtype=torch.long, device=device)
    cache: Optional[DecoderCache] = None
    n_cand = min(2 * k, k * v)
    for t in range(max_len):
        length = t + 1  # tokens of a caption that ends at this step
        log_probs, cache = model.decode_step(memory, token, cache, backend=backend)
        log_probs = _mask_forbidden(log_probs.float(), forbidden)  # [B * K, V]
        cand = (live.reshape(b * k, 1) + log_probs).reshape(b, k * v)
        cand_scores, cand_index = cand.topk(n_cand, dim=1)  # [B, C], best first
        cand_beam, cand_token = cand_index // v, cand_index % v
        src_rows = (image_base + cand_beam).reshape(-1)  # [B * C] rows of the source beams
        cand_lp = log_probs[src_rows, cand_token.reshape(-1)].reshape(b, n_cand)

        # the top K candidates that end go to the pool (at the last step every candidate ends)
        ends = (cand_token == cfg.eos_id) if length < max_len else torch.ones_like(cand_token, dtype=torch.bool)
        in_top_k = (torch.arange(n_cand, device=device) < k)[None, :]
        penalised = cand_scores / length_penalty_factor(length, alpha)
        penalised = torch.where(ends & in_top_k, penalised, torch.full_like(penalised, neg_inf))
        top_pen, top_c = penalised.max(dim=1)  # [B]
        better = top_pen > best
        if bool(better.any()):
            rows = (image_base[:, 0] + cand_beam.gather(1, top_c[:, None])[:, 0])  # [B]
            seq = torch.cat([hist_tokens[rows], cand_token.gather(1, top_c[:, None])], dim=1)
            seq_lp = torch.cat([hist_lps[rows], cand_lp.gather(1, top_c[:, None])], dim=1)
            pad = torch.full((b, max_len - length), cfg.pad_id, dtype=torch.long, device=device)
            seq = torch.cat([seq, pad], dim=1)
            seq_lp = torch.cat([seq_lp, torch.zeros(b, max_len - length, device=device)], dim=1)
            best = torch.where(better, top_pen, best)
            best_tokens = torch.where(better[:, None], seq, best_tokens)
            best_lps = torch.where(better[:, None], seq_lp, best_lps)
            best_len = torch.where(better, torch.full_like(best_len, length), best_len)
        if length == max_len:
            break

        # live candidates: the first K that did not end (at most K of the 2K end: one per beam)
        keep = ~ends
        rank = keep.long().cumsum(dim=1) - 1
        keep &= rank < k
        order = torch.sort((~keep).long(), dim=1, stable=True).indices[:, :k]  # kept ones first, by score
        live = cand_scores.gather(1, order)
        sel_beam, sel_token = cand_beam.gather(1, order), cand_token.gather(1, order)
        sel_lp = cand_lp.gather(1, order)
        live = torch.where(torch.isfinite(sel_lp), live, torch.full_like(live, neg_inf))

        # an image is done when no live beam can beat its best finished caption: a live raw score
        # s <= 0 can at best become s / (the largest penalty factor of the lengths still possible)
        factors = [length_penalty_factor(n, alpha) for n in (length + 1, max_len)]
        bound = live.max(dim=1).values / max(factors)
        done = best >= bound
        live = torch.where(done[:, None], torch.full_like(live, neg_inf), live)
        if bool(done.all()):
            break

        rows = (image_base + sel_beam).reshape(-1)  # [B * K]
        cache = cache.index_select(rows)
        token = sel_token.reshape(-1)
        hist_tokens = torch.cat([hist_tokens[rows], token[:, None]], dim=1)
        hist_lps = torch.cat([hist_lps[rows], sel_lp.reshape(-1, 1)], dim=1)

    width = int(best_len.max())
    return Decoded(best_tokens[:, :width], best_len, best, best_lps[:, :width], eos_id=cfg.eos_id)
