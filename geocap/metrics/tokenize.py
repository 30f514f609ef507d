"""PTB tokenisation of captions, as done by the coco-caption evaluation.

``tokenize_captions`` runs pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase``, then removal of the tokens in
:data:`PUNCTUATIONS`) when ``java`` is on the PATH and pycocoevalcap is installed; otherwise
it runs :func:`python_ptb_tokenize`, a pure-Python approximation for plain English captions.
Which one ran is returned alongside the result (and :func:`java_available` says which one
``backend="auto"`` will try first).

Conventions of the output (both backends): lower case; words separated by single spaces;
punctuation tokens in :data:`PUNCTUATIONS` removed; clitics split off (``man's`` ->
``man 's``, ``don't`` -> ``do n't``); brackets kept as the PTB escapes ``-lrb- -rrb- -lsb-
-rsb- -lcb- -rcb-`` (coco-caption's punctuation list holds the *upper-case* escapes, which
never match after ``-lowerCase``, so the escapes stay in the captions -- reproduced here).
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Hashable, Mapping, Sequence

__all__ = ["PUNCTUATIONS", "TOKENIZERS", "java_available", "python_ptb_tokenize", "tokenize_captions"]

#: The tokenizer backends: Stanford's PTBTokenizer (``java``), the Python fallback (``python``), or
#: ``auto`` (java when present). The one list; evaluate's and the study's options check against it.
TOKENIZERS = ("auto", "java", "python")

#: Tokens dropped after PTB tokenisation (the list used by coco-caption's PTBTokenizer).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na"}
_ABBREVIATIONS = frozenset(["mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.",
                            "prof.", "inc.", "co.", "ltd.", "no.", "mt."])
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
# characters always split into their own token
_SPLIT_CHARS = re.compile(r"""([!?]+|[;()\[\]{}"$%&`])""")  # "!!" stays one token, as in PTB
# commas / colons except between digits (1,000  10:30)
_COMMA = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")


def java_available() -> bool:
    """True when a ``java`` executable is on the PATH (needed by PTBTokenizer and METEOR)."""
    return shutil.which("java") is not None


def _split_token(tok: str) -> list[str]:
    out: list[str] = []
    if tok in ("...", "--", "-"):
        return [tok]
    # trailing period (sentence end) unless an abbreviation or an inner-period word (u.s.)
    tail: list[str] = []
    if tok.endswith("...") and len(tok) > 3:
        tok, tail = tok[:-3], ["..."]
    elif tok.endswith(".") and len(tok) > 1 and "." not in tok[:-1] and tok not in _ABBREVIATIONS:
        tok, tail = tok[:-1], ["."]
    # quotes around words
    lead = len(tok) - len(tok.lstrip("'"))
    if lead:
        out.append("'" * lead)
        tok = tok[lead:]
    trail = len(tok) - len(tok.rstrip("'"))
    if trail:
        tail.insert(0, "'" * trail)
        tok = tok[: len(tok) - trail]
    if tok.endswith("-") and len(tok) > 1:
        tok, tail = tok.rstrip("-"), ["-"] + tail
    if tok.startswith("-") and len(tok) > 1 and not tok[1:2].isdigit():
        out.append("-")
        tok = tok.lstrip("-")
    m = _CLITIC.match(tok)
    if m:
        out.extend([m.group(1), m.group(2)])
    elif tok:
        out.extend(_SPLIT_WORDS.get(tok, tok).split())
    return out + tail


def python_ptb_tokenize(caption: str) -> str:
    """Pure-Python approximation of coco-caption's PTB tokenisation of one caption.

    Lower-cases; splits off ``, ; : ! ? " ( ) [ ] { } $ % & `` and sentence-final periods
    (keeping abbreviations such as ``u.s.``, ``mr.``, ``e.g.`` and numbers such as ``3.5``,
    ``1,000``); splits clitics (``'s 'm 're 've 'll 'd n't``) and ``cannot/gonna/gotta/
    wanna``; maps brackets to ``-lrb-`` etc.; removes the :data:`PUNCTUATIONS` tokens and
    the double quote; joins with single spaces.  It matches Stanford's PTBTokenizer on plain
    English captions but not on every input (URLs, emoticons, unusual abbreviations...).
    """
    text = caption.replace("\n", " ").lower()
    text = text.replace("--", " -- ")
    text = _SPLIT_CHARS.sub(r" \1 ", text)
    text = _COMMA.sub(lambda m: f" {m.group(1) or m.group(2)} ", text)
    tokens: list[str] = []
    for raw in text.split():
        for tok in _split_token(raw):
            tok = _BRACKETS.get(tok, tok)
            if tok in PUNCTUATIONS or tok == '"' or tok == "`" or set(tok) <= {"'", "`"}:
                continue
            tokens.append(tok)
    return " ".join(tokens)


def _java_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    wrapped = {k: [{"caption": c} for c in v] for k, v in captions.items()}
    out = PTBTokenizer().tokenize(wrapped)
    result = {k: out.get(k, []) for k in captions}
    for k, v in captions.items():
        if len(result[k]) != len(v):
            raise RuntimeError(f"PTBTokenizer returned {len(result[k])} captions for image "
                               f"{k!r}, expected {len(v)}")
    return result


def tokenize_captions(captions: Mapping[Hashable, Sequence[str]], backend: str = "auto"
                      ) -> tuple[dict, str]:
    """Tokenise ``image_id -> list of captions`` like coco-caption.

    Args:
        captions: image id -> list of raw caption strings (a single string is taken as a
            one-element list).
        backend: ``"java"`` (pycocoevalcap's PTBTokenizer; raises if it cannot run),
            ``"python"`` (:func:`python_ptb_tokenize`), or ``"auto"``: Java when
            available, falling back to Python (with a warning) if the Java tokenizer fails.

    Returns:
        ``(tokenized, backend_used)``: ``image id -> list of tokenised captions`` in the
        input order, and ``"java"`` or ``"python"``.
    """
    caps = {k: [v] if isinstance(v, str) else list(v) for k, v in captions.items()}
    if backend not in TOKENIZERS:
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "java" or (backend == "auto" and java_available()):
        if sum(len(v) for v in caps.values()) == 0:
            return {k: [] for k in caps}, "java"
        try:
            return _java_tokenize(caps), "java"
        except Exception as exc:  # noqa: BLE001 -- any failure of the Java subprocess
            if backend == "java":
                raise
            warnings.warn(f"PTBTokenizer (Java) failed ({exc!r}); using the Python fallback",
                          RuntimeWarning, stacklevel=2)
    return {k: [python_ptb_tokenize(c) for c in v] for k, v in caps.items()}, "python"
