import json

import numpy as np
import pytest

from common.tokenizers import ByteTokenizer, CharTokenizer, tokenizer_from_dict


# ---- CharTokenizer ----

def test_char_per_character():
    tok = CharTokenizer(["0", "1", "|"])
    assert tok.sep == "" and tok.vocab_size == 3
    assert tok.encode("01|10") == [0, 1, 2, 1, 0]
    assert tok.decode([0, 1, 2, 1, 0]) == "01|10"
    assert tok.token_to_id("|") == 2


def test_char_multi_character_symbols_split_on_whitespace():
    tok = CharTokenizer(["<pad>", "->", ",", "h12", "a", "b"])
    assert tok.sep == " "
    ids = tok.encode("a -> b ,  h12\n<pad>")
    assert ids == [4, 1, 5, 2, 3, 0]
    assert tok.decode(ids) == "a -> b , h12 <pad>"


@pytest.mark.parametrize("text", ["", "0", "0110|1", "|||"], ids=["empty", "one", "mixed", "bars"])
def test_char_round_trip(text):
    tok = CharTokenizer(["0", "1", "|"])
    assert tok.decode(tok.encode(text)) == text


def test_char_decode_accepts_numpy():
    tok = CharTokenizer(["x", "y"])
    assert tok.decode(np.array([[1, 0]], np.int32)) == "yx"


@pytest.mark.parametrize("text, message", [
    ("01x1", "'x' at position 2"),
    ("0 1", "' ' at position 1"),
], ids=["letter", "space"])
def test_char_unknown_character(text, message):
    with pytest.raises(ValueError, match=message):
        CharTokenizer(["0", "1"]).encode(text)


def test_char_unknown_symbol_names_token_and_position():
    tok = CharTokenizer(["a", "->", "b"])
    with pytest.raises(ValueError, match=r"'zz' at token 2 \(character 5\)"):
        tok.encode("a -> zz b")


@pytest.mark.parametrize("symbols, sep, message", [
    ([], None, "must not be empty"),
    (["a", "a"], None, "duplicate"),
    (["a", ""], None, "non-empty"),
    (["ab", "c"], "", "single-character"),
    (["a b", "cd"], None, "without whitespace"),
    (["a"], "-", "sep must be"),
], ids=["empty", "duplicate", "empty-symbol", "long-symbol-per-char", "space-in-symbol", "bad-sep"])
def test_char_bad_vocabulary(symbols, sep, message):
    with pytest.raises(ValueError, match=message):
        CharTokenizer(symbols, sep=sep)


def test_char_decode_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        CharTokenizer(["a", "b"]).decode([0, 2])


# ---- ByteTokenizer ----

@pytest.mark.parametrize("text", ["", "hello", "naïve 日本語 🙂", "line\nbreak\t"],
                         ids=["empty", "ascii", "unicode", "whitespace"])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_specials():
    tok = ByteTokenizer()
    assert tok.vocab_size == 258 and tok.eot_id == 256 and tok.pad_id == 257
    ids = tok.encode("ab") + [tok.eot_id] + tok.encode("c") + [tok.pad_id]
    assert tok.decode(ids) == "ab<eot>c<pad>"
    assert tok.decode(ids, skip_special=True) == "abc"
    assert tok.token_to_id("<eot>") == 256 and tok.token_to_id("A") == 65


def test_byte_invalid_utf8_is_replaced_not_raised():
    tok = ByteTokenizer()
    cut = tok.encode("日")[:2]  # half of a 3-byte character
    assert tok.decode(cut + tok.encode("x")) == "\ufffdx"
    assert tok.decode(cut + [tok.eot_id]) == "\ufffd<eot>"


def test_byte_decode_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        ByteTokenizer().decode([258])


# ---- to_dict / tokenizer_from_dict ----

@pytest.mark.parametrize("tok, text", [
    (CharTokenizer(["0", "1", "|"]), "01|1"),
    (CharTokenizer(["x", "->", "y"]), "x -> y"),
    (ByteTokenizer(), "héllo"),
], ids=["char", "symbols", "byte"])
def test_dict_round_trip_through_json(tok, text):
    back = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert type(back) is type(tok)
    assert back.to_dict() == tok.to_dict() and back.vocab_size == tok.vocab_size
    assert back.encode(text) == tok.encode(text)


@pytest.mark.parametrize("d, message", [
    ({"type": "bpe"}, "unknown tokenizer type"),
    ({"symbols": ["a"]}, "'type' key"),
    ({"type": "char"}, "needs 'symbols'"),
    ({"type": "byte", "extra": 1}, "unknown key"),
], ids=["bad-type", "no-type", "no-symbols", "extra-key"])
def test_from_dict_errors(d, message):
    with pytest.raises(ValueError, match=message):
        tokenizer_from_dict(d)
