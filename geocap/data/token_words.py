"""Sub-word tokens shown as words: a caption's token strings grouped into the words they spell.

A Hugging Face captioner's tokens are its tokenizer's pieces (``'Ġc' 'up'``, ``'▁two'``,
``'refrigerator' '##s'``); the viewer shows each piece as the text it adds and groups the pieces
of one word, and the index searches the words. The convention is read off the record's own
tokens, so a record of whole words (geocap's models, word-level tokenizers) is unchanged:

- byte-level BPE (GPT-2, RoBERTa: some token holds ``'Ġ'``, the byte-level space): each piece's
  characters are GPT-2's printable stand-ins for bytes, mapped back and decoded as UTF-8 (per
  word, so a character split over pieces is whole); a piece starting with ``'Ġ'`` starts a word;
- SentencePiece (some token holds ``'▁'``): ``'▁'`` is a space; a piece starting with it starts a word;
- WordPiece (BERT: some token starts with ``'##'``): a ``'##'`` piece continues the word before;
- otherwise every token is a word.

A piece that is only a space (a lone ``'Ġ'`` / ``'▁'``) adds no letters: it is shown as ``'␣'``
and the piece after it starts the word (as :func:`geocap.hf.referents.word_starts` reads the
tokenizer). Special tokens (``<...>``, ``[...]``) are words of their own, shown as they are.
"""
from __future__ import annotations

import re

__all__ = ["caption_words", "token_words"]

BYTE_SPACE, SP_SPACE, WP_PREFIX = "\u0120", "\u2581", "##"
SPACE_MARK = "\u2423"
_SPECIAL = re.compile(r"^(<[^<>\s]*>|\[[^\[\]\s]*\])$")


def _gpt2_byte_table() -> dict:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _gpt2_byte_table()


def _style(tokens) -> str:
    if any(BYTE_SPACE in t for t in tokens):
        return "byte-level"
    if any(SP_SPACE in t for t in tokens):
        return "sentencepiece"
    if any(t.startswith(WP_PREFIX) and len(t) > 2 for t in tokens):
        return "wordpiece"
    return "words"


def _byte_text(pieces: list) -> str:
    """The UTF-8 text of byte-level pieces (a piece with a character outside the alphabet as it is)."""
    out, raw = [], bytearray()
    for piece in pieces:
        if all(c in _BYTES for c in piece):
            raw.extend(_BYTES[c] for c in piece)
        else:
            out.append(raw.decode("utf-8", errors="replace"))
            raw = bytearray()
            out.append(piece)
    out.append(raw.decode("utf-8", errors="replace"))
    return "".join(out)


def token_words(tokens) -> tuple:
    """``(pieces, word_of)``: per token the text it shows (its marker removed; ``'␣'`` for a bare
    space token) and the index of the word it belongs to (``-1`` for a bare space token, which
    belongs to none); the words are :func:`caption_words`'s. ``"<eos>"`` is a word of its own."""
    tokens = [str(t) for t in tokens]
    style = _style(tokens)
    pieces, word_of, count, pending = [], [], 0, True
    for t in tokens:
        special = bool(_SPECIAL.match(t))
        if style == "byte-level" and not special:
            starts, body = t.startswith(BYTE_SPACE), t.lstrip(BYTE_SPACE)
            text = _byte_text([body])
        elif style == "sentencepiece" and not special:
            starts, body = t.startswith(SP_SPACE), t.lstrip(SP_SPACE)
            text = body.replace(SP_SPACE, " ")
        elif style == "wordpiece" and not special:
            starts, text = not t.startswith(WP_PREFIX), t[2:] if t.startswith(WP_PREFIX) else t
        else:
            starts, text = True, t
        if not text.strip():                     # a bare space: the next piece starts a word
            pieces.append(SPACE_MARK)
            word_of.append(-1)
            pending = True
            continue
        if starts or pending or special or not count:
            count += 1
        pieces.append(text)
        word_of.append(count - 1)
        pending = special
    return pieces, word_of


def caption_words(tokens) -> list:
    """The caption's words: its tokens grouped by :func:`token_words` and decoded (byte-level
    pieces as UTF-8 bytes together), ``"<eos>"`` included when it is there."""
    tokens = [str(t) for t in tokens]
    pieces, word_of = token_words(tokens)
    groups: dict = {}
    for k, w in enumerate(word_of):
        if w >= 0:
            groups.setdefault(w, []).append(k)
    if _style(tokens) == "byte-level":
        return [_byte_text([tokens[k].lstrip(BYTE_SPACE) for k in ks]) for _, ks in sorted(groups.items())]
    return ["".join(pieces[k] for k in ks) for _, ks in sorted(groups.items())]
