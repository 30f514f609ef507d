"""Caption words of sub-word tokenizers (byte-level BPE, SentencePiece, WordPiece, built here): which
token starts which word, and so which token carries a noun's referent."""
import pytest

pytest.importorskip("transformers", reason="geocap.hf needs transformers (pip install 'geocap[hf]')")
pytest.importorskip("tokenizers", reason="the tokenizers are built with the tokenizers library")

from hf_tokenizers import TOKENIZERS  # noqa: E402

from geocap.hf.models import import_transformers  # noqa: E402
from geocap.hf.referents import CategoryWords, caption_referents, word_starts  # noqa: E402

transformers = import_transformers()
CAPTION = "two refrigerators and a bowl"
PIECES = {"byte-level BPE": ["two", "\u0120", "refrigerators", "\u0120and", "\u0120a", "\u0120bowl", "</s>"],
          "SentencePiece": ["\u2581two", "\u2581", "refrigerators", "\u2581and", "\u2581a", "\u2581bowl", "</s>"],
          "WordPiece": ["two", "refrigerator", "##s", "and", "a", "bowl", "</s>"]}
# per token the word it starts: a lone space token starts none, the word's first piece with letters does
STARTS = {"byte-level BPE": [0, -1, 1, 2, 3, 4, -1], "SentencePiece": [0, -1, 1, 2, 3, 4, -1],
          "WordPiece": [0, 1, -1, 2, 3, 4, -1]}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_lone_space_token_shifts_no_word(name):
    tok = TOKENIZERS[name](transformers)
    ids = tok(CAPTION, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(ids) == PIECES[name]          # the tokenizer is the kind meant
    words, starts = word_starts(ids, tok)
    assert words == CAPTION.split()
    assert starts == STARTS[name]
    # refrigerator (category 5) and bowl (category 9): on the tokens of those words, nowhere else
    referents = caption_referents(ids, tok, CategoryWords({5: "refrigerator", 9: "bowl"}), {5: 0, 9: 1})
    expected = [-1] * len(ids)
    expected[STARTS[name].index(1)], expected[STARTS[name].index(4)] = 0, 1
    assert referents.tolist() == expected
