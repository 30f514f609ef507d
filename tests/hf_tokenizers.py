"""Tokenizers of the kinds Hugging Face captioners use, built here from a few words (no download):
byte-level BPE (GPT-2, RoBERTa) and SentencePiece-style BPE that can emit a bare space token
(``'Ġ'`` / ``'▁'`` alone, before a word the merges do not join to its space), and WordPiece (BERT).

``WORDS`` are the words each knows; ``JOINED``: the words written with their space in one token;
the others come as a lone space token and the word (byte-level BPE, SentencePiece). The word
pieces split ``refrigerators`` into ``refrigerator`` ``##s`` (WordPiece) or keep it whole."""
from __future__ import annotations

WORDS = ["two", "refrigerators", "and", "a", "bowl", "cup", "on", "the", "table", "dog", "cat", "near"]
JOINED = {"and", "a", "bowl", "cup", "on", "the", "table", "near"}
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]           # pad, start, end, unknown: ids 0..3


def _chain(pieces):
    """A BPE vocabulary and merges building each piece left to right from its characters."""
    vocab = {s: i for i, s in enumerate(SPECIAL)}
    merges = []
    for piece in pieces:
        for ch in piece:
            vocab.setdefault(ch, len(vocab))
        current = piece[0]
        for ch in piece[1:]:
            if (current, ch) not in merges:
                merges.append((current, ch))
            current += ch
            vocab.setdefault(current, len(vocab))
    return vocab, merges


def _fast(core, transformers):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")


def byte_level_bpe(transformers):
    """GPT-2 style: "two refrigerators" -> ``two``, ``Ġ``, ``refrigerators``; "and" -> ``Ġand``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    space = "\u0120"
    vocab, merges = _chain([w if w not in JOINED else space + w for w in WORDS] + [space])
    core = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return _fast(core, transformers)


def sentencepiece_bpe(transformers):
    """SentencePiece style (Metaspace): "two refrigerators" -> ``▁two``, ``▁``, ``refrigerators``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    space = "\u2581"
    vocab, merges = _chain([space + w if w in JOINED or w == "two" else w for w in WORDS] + [space])
    core = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    return _fast(core, transformers)


def wordpiece(transformers):
    """BERT style: "refrigerators" -> ``refrigerator``, ``##s``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIAL + [w for w in WORDS if w != "refrigerators"]
                                             + ["refrigerator", "##s"])}
    core = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece(prefix="##")
    return _fast(core, transformers)


TOKENIZERS = {"byte-level BPE": byte_level_bpe, "SentencePiece": sentencepiece_bpe, "WordPiece": wordpiece}
