"""Self-critical sequence training (SCST; Rennie et al. 2017, "Self-critical Sequence Training
for Image Captioning") with a CIDEr-D reward.

For a batch of ``B`` images (the per-image dataset: ``CaptionDataset(per_image=True)``):

- ``K`` captions per image are sampled from the model (:func:`geocap.decoding.sample`:
  multinomial at temperature 1, the model in its training mode, gradients kept), rows
  image-major (image i's samples are rows ``i * K .. i * K + K - 1``);
- each sample's reward is its CIDEr-D against its image's reference captions, with document
  frequencies fixed once on the references of the training split (:func:`reward_scorer`, a
  :class:`~geocap.metrics.CiderD`); captions are the decoded words joined by spaces
  (``Vocabulary.decode``: up to <eos>, <unk> spelt ``<unk>``), references the tokenised
  captions of the captions directory;
- the baseline is ``"greedy"``: the reward of the image's greedy caption, decoded in eval mode
  without gradients by the unwrapped model (so never through DDP's hooks), or ``"mean"``: for
  each sample the mean reward of its image's ``K - 1`` other samples (``K >= 2``);
- loss ``= -mean over the B * K samples of (reward - baseline) * sum_t log p(w_t)``, the sum over
  the sample's tokens up to and including <eos> (nothing after; a caption cut at ``max_len`` has
  no <eos>). Rewards and baselines are constants.

:class:`PolicyModule` is the module the trainer wraps in DistributedDataParallel: one forward
for teacher forcing and for sampling, so that DDP sees every differentiable pass and all-reduces
its gradients as usual.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from geocap.data.vocab import Vocabulary
from geocap.decoding import Decoded, greedy_decode, sample
from geocap.kernels.deprecation import renamed_argument
from geocap.metrics import CiderD
from geocap.model import ObjectRelationTransformer
from geocap.errors import DataError

__all__ = ["BASELINES", "PolicyModule", "SCSTObjective", "SCSTStats", "captions_text", "mean_baseline",
           "reward_scorer", "scst_loss"]

BASELINES = ("greedy", "mean")


def captions_text(decoded: Decoded, vocab: Vocabulary) -> list[str]:
    """Each row of ``decoded`` as words joined by spaces (up to <eos>; rows cut at ``max_len``
    keep all their words): what CIDEr-D scores, for rewards and validation alike."""
    return [vocab.decode(row) for row in decoded.tokens.tolist()]


def reward_scorer(dataset) -> CiderD:
    """The CIDEr-D scorer of SCST rewards: the references of every image of ``dataset`` (a
    :class:`~geocap.data.dataset.CaptionDataset` of the training split) define the document
    frequencies, computed once here. ValueError naming the image when one has no reference."""
    refs = {}
    for image_id in dataset.image_ids.tolist():
        captions = list(dataset.references(int(image_id)))
        if not captions:
            raise DataError(f"image {image_id} of split {dataset.split!r} has no reference caption")
        refs[int(image_id)] = captions
    return CiderD(refs)


def mean_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards [B, K]`` -> ``[B, K]``: for each sample the mean reward of the same image's
    other ``K - 1`` samples. ValueError unless ``K >= 2``."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, K], got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"the mean baseline needs at least 2 samples per image, got {k}")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def scst_loss(token_log_probs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``-mean_r(advantages[r] * sum_t token_log_probs[r, t] * mask[r, t])``.

    ``token_log_probs [R, T]`` the log-probability of each sampled token (carrying the graph),
    ``mask [R, T]`` bool, True at the tokens up to and including <eos>, ``advantages [R]``
    reward minus baseline (treated as a constant). Returns a float32 scalar."""
    if token_log_probs.dim() != 2 or mask.shape != token_log_probs.shape:
        raise ValueError(f"token_log_probs and mask must both be [R, T], got {tuple(token_log_probs.shape)} "
                         f"and {tuple(mask.shape)}")
    if advantages.shape != token_log_probs.shape[:1]:
        raise ValueError(f"advantages must be [R] = [{token_log_probs.shape[0]}], got {tuple(advantages.shape)}")
    seq_log_prob = (token_log_probs.float() * mask).sum(dim=1)
    return -(advantages.detach().float().to(seq_log_prob.device) * seq_log_prob).mean()


class PolicyModule(nn.Module):
    """Wraps the captioner for training (the module DDP wraps): ``forward(features, boxes,
    attention_mask, tokens)`` is the model's teacher forcing (``tokens [B, T]``, one caption per
    image, -> ``log_probs [B, T, V]``); with ``image_index [R]`` (int64, the image of each row of
    ``tokens [R, T]``) the ``B`` images are encoded once and the memory expanded to the ``R``
    captions (:meth:`~geocap.model.ObjectRelationTransformer.teacher_force`; the cross-entropy
    step), and ``positions`` (bool ``[R, T]``, optional) packs the output to those positions'
    ``[M, V]``; ``forward(features, boxes, attention_mask, samples=K, max_len=L)`` encodes the ``B``
    images and draws ``K`` captions each (:func:`geocap.decoding.sample`), returning the
    :class:`Decoded` (``B * K`` rows, image-major, ``token_log_probs`` with the graph).
    ``attention_mask [B, N]`` bool, True = real box (``box_mask`` is its deprecated alias)."""

    def __init__(self, model: ObjectRelationTransformer):
        super().__init__()
        self.model = model

    @renamed_argument("box_mask", "attention_mask")
    def forward(self, features: torch.Tensor, boxes: torch.Tensor, attention_mask: Optional[torch.Tensor],
                tokens: Optional[torch.Tensor] = None, *, image_index: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, samples: int = 0, max_len: int = 16):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError(f"samples must be an int >= 0, got {samples!r}")
        if samples == 0:
            if tokens is None:
                raise ValueError("PolicyModule needs tokens (teacher forcing) or samples > 0 (sampling)")
            if image_index is None and positions is None:
                return self.model(features, boxes, attention_mask, tokens)
            if image_index is None:
                image_index = torch.arange(features.shape[0], device=features.device)
            if not isinstance(image_index, torch.Tensor) or image_index.dim() != 1 or image_index.dtype != torch.int64:
                raise ValueError(f"image_index must be an int64 tensor [R], got "
                                 f"{getattr(image_index, 'dtype', type(image_index).__name__)} "
                                 f"{tuple(getattr(image_index, 'shape', ()))}")
            memory = self.model.encode(features, boxes, attention_mask)
            return self.model.teacher_force(memory.index_select(image_index), tokens, positions=positions)
        memory = self.model.encode(features, boxes, attention_mask)
        return sample(self.model, memory, n=samples, max_len=max_len)


@dataclass
class SCSTStats:
    """One SCST batch: means over its ``B * K`` samples of the ``reward``, the ``baseline`` and
    the ``sample_length`` (tokens, <eos> included); ``tokens`` the sampled tokens in all;
    ``rewards`` and ``baselines`` float64 ``[B, K]``; ``captions`` the ``B * K`` sampled
    captions (image-major); ``greedy_captions`` the ``B`` greedy captions (greedy baseline) or
    None."""
    reward: float
    baseline: float
    sample_length: float
    tokens: int
    rewards: torch.Tensor
    baselines: torch.Tensor
    captions: list
    greedy_captions: Optional[list] = None


class SCSTObjective:
    """The SCST loss of a batch (see the module doc).

    ``scorer``: the reward's :class:`~geocap.metrics.CiderD` (:func:`reward_scorer`); ``vocab``
    the model's vocabulary; ``samples`` K; ``baseline`` "greedy" or "mean"; ``max_len`` the most
    tokens per sample (<eos> included), as in :func:`geocap.decoding.sample`.
    """

    def __init__(self, scorer: CiderD, vocab: Vocabulary, *, samples: int = 5, baseline: str = "greedy",
                 max_len: int = 16):
        if baseline not in BASELINES:
            raise ValueError(f"SCST baseline must be 'greedy' or 'mean', got {baseline!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"SCST samples must be a positive int, got {samples!r}")
        if baseline == "mean" and samples < 2:
            raise ValueError(f"the SCST mean baseline needs at least 2 samples per image (the others' mean "
                             f"reward), got samples={samples}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"SCST max_len must be a positive int, got {max_len!r}")
        self.scorer, self.vocab = scorer, vocab
        self.samples, self.baseline, self.max_len = samples, baseline, max_len

    def rewards(self, captions: list, image_ids: list) -> torch.Tensor:
        """CIDEr-D of ``captions[i]`` against the references of ``image_ids[i]``: float64 ``[len]``."""
        return torch.from_numpy(self.scorer.scores(captions, image_ids))

    def __call__(self, policy: Callable, model: ObjectRelationTransformer, batch, *,
                 autocast: Optional[Callable[[], contextlib.AbstractContextManager]] = None
                 ) -> tuple[torch.Tensor, SCSTStats]:
        """The loss of ``batch`` (a collated per-image :class:`~geocap.data.dataset.Batch`, on the
        model's device) and its :class:`SCSTStats`.

        ``policy``: a :class:`PolicyModule` of ``model`` or its DDP wrapper (the sampling runs
        through it, in the mode the caller set); ``model``: the unwrapped captioner, which
        decodes the greedy baseline in eval mode under ``no_grad`` (its mode is restored).
        ``autocast``: a factory of the mixed-precision context for the model's passes."""
        amp = autocast if autocast is not None else contextlib.nullcontext
        image_ids = batch.image_ids.tolist()
        b, k = len(image_ids), self.samples
        greedy_captions = None
        if self.baseline == "greedy":
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), amp():
                    memory = model.encode(batch.features, batch.boxes, batch.attention_mask)
                    greedy = greedy_decode(model, memory, max_len=self.max_len)
            finally:
                model.train(was_training)
            greedy_captions = captions_text(greedy, self.vocab)
        with amp():
            decoded = policy(batch.features, batch.boxes, batch.attention_mask, samples=k, max_len=self.max_len)
        captions = captions_text(decoded, self.vocab)
        sample_ids = [i for i in image_ids for _ in range(k)]
        if greedy_captions is not None:
            scores = self.rewards(captions + greedy_captions, sample_ids + image_ids)
            rewards = scores[:b * k].reshape(b, k)
            baselines = scores[b * k:, None].expand(b, k)
        else:
            rewards = self.rewards(captions, sample_ids).reshape(b, k)
            baselines = mean_baseline(rewards)
        advantages = (rewards - baselines).reshape(-1).float()
        loss = scst_loss(decoded.token_log_probs, decoded.mask, advantages)
        stats = SCSTStats(reward=float(rewards.mean()), baseline=float(baselines.mean()),
                          sample_length=float(decoded.lengths.float().mean()),
                          tokens=int(decoded.lengths.sum()), rewards=rewards,
                          baselines=baselines.contiguous(), captions=captions, greedy_captions=greedy_captions)
        return loss, stats
