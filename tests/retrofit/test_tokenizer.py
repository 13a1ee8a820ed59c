"""common.hf_tokenizer: ids equal to transformers' tokenizers (a tiny tokenizer.json folder, a tiny GGUF vocabulary,
the bundled SmolLM2 GGUF), special ids, the config block round trip."""

import json

import pytest

from .conftest import SPECIALS, write_tiny_gguf, hf_model
from .strings import awkward_strings

pytest.importorskip("tokenizers")

from common.hf_tokenizer import HFTokenizer  # noqa: E402

STRINGS = awkward_strings()


def test_strings_cover_the_brief():
    assert len(STRINGS) >= 300 and len(set(STRINGS)) > 290
    for needle in ("<|im_start|>", "\U0001f600", "\n\n", "    ", "\u6f22"):
        assert sum(needle in s for s in STRINGS) > 10, needle


def test_tiny_tokenizer_json_equals_transformers(tmp_path, tiny_bpe):
    transformers = pytest.importorskip("transformers")
    text, _, _ = tiny_bpe
    (tmp_path / "tokenizer.json").write_text(text)
    eos = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}  # the older AddedToken spelling
    config = {"bos_token": "<|im_start|>", "eos_token": eos,
              "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = HFTokenizer.from_files({p.name: p.read_text() for p in tmp_path.iterdir()})
    for s in STRINGS:
        ids = ours.encode(s)
        assert ids == theirs(s, add_special_tokens=False)["input_ids"], repr(s)
        assert ours.decode(ids) == theirs.decode(ids), repr(s)
        assert ours.decode(ids, skip_special=True) == theirs.decode(ids, skip_special_tokens=True), repr(s)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.vocab_size == len(theirs)


def test_tiny_gguf_vocabulary_equals_transformers_and_original(tmp_path, tiny_bpe):
    """tokenizer.json rebuilt from GGUF metadata tokenizes like the tokenizer it was written from and like
    transformers' GGUF tokenizer (pre-tokenizer "gpt-2": the plain GPT-2 regex in both)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from tokenizers import Tokenizer

    from convert.gguf import read_gguf

    text, tokens, merges = tiny_bpe
    path = write_tiny_gguf(tmp_path / "t.gguf", hf_model("llama", vocab_size=len(tokens)), tokens, merges)
    ours = HFTokenizer.from_files(read_gguf(path, load_tensors=False, hash_file=False).files)
    original = Tokenizer.from_str(text)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for s in STRINGS:
        ids = ours.encode(s)
        assert ids == original.encode(s).ids, repr(s)
        assert ids == theirs(s, add_special_tokens=False)["input_ids"], repr(s)
        assert ours.decode(ids) == theirs.decode(ids), repr(s)
    assert (ours.bos_token, ours.eos_token, ours.eot_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert ours.eos_id == tokens.index("<|im_end|>") == SPECIALS.index("<|im_end|>")


def test_config_block_round_trip_and_errors(tmp_path, tiny_bpe):
    text, _, _ = tiny_bpe
    tok = HFTokenizer(text, bos_token="<|im_start|>", eos_token="<|endoftext|>", eot_token="<|im_end|>",
                      stop_tokens=["<|endoftext|>"])
    block = json.loads(json.dumps(tok.to_dict()))
    assert block["type"] == "hf" and block["file"] == "tokenizer.json"
    assert tok.stop_ids == (tok.eot_id, tok.eos_id)
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    back = HFTokenizer.from_dict(block, tmp_path)
    assert back.to_dict() == block and back.encode("Hello <|im_end|>") == tok.encode("Hello <|im_end|>")
    with pytest.raises(ValueError, match="unknown key"):
        HFTokenizer.from_dict({**block, "extra": 1}, tmp_path)
    with pytest.raises(ValueError, match="inside the model folder"):
        HFTokenizer.from_dict({**block, "file": "../tokenizer.json"}, tmp_path)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(text, eos_token="<eos>")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        HFTokenizer("{")


def test_stop_tokens_from_generation_config(tiny_bpe):
    text, tokens, _ = tiny_bpe
    files = {"tokenizer.json": text, "tokenizer_config.json": json.dumps({"eos_token": "<|endoftext|>"}),
             "generation_config.json": json.dumps({"eos_token_id": [0, 2]})}
    tok = HFTokenizer.from_files(files, chat_template="{{ '<|im_start|>' }}...{{ '<|im_end|>' }}")
    assert tok.eot_token == "<|im_end|>" and tok.eos_token == "<|endoftext|>"
    assert set(tok.stop_ids) == {0, 2}


# SmolLM2 (bundled GGUF, pre-tokenizer "smollm"): ids checked once against transformers' GGUF tokenizer with
# SmolLM2's own pre-tokenizer (digits split first, as llama.cpp and the model's tokenizer.json do); the full
# comparison on every string is test_smollm2_equals_transformers below (transformers builds its tokenizer in ~7 s).
SMOLLM2_IDS = {
    "Hello, world!": [19556, 28, 905, 17],
    "caf\u00e9 \U0001f600  12345\n\n\tx": [83, 1939, 2756, 40303, 218, 256, 33, 34, 35, 36, 37, 1116, 197, 104],
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n": [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198],
    "  1  22 333": [256, 33, 256, 34, 34, 216, 35, 35, 35],
}


def test_smollm2_known_ids_and_specials(smollm2_source):
    tok = HFTokenizer.from_files(smollm2_source.files, chat_template=smollm2_source.chat_template)
    for s, ids in SMOLLM2_IDS.items():
        assert tok.encode(s) == ids, repr(s)
        assert tok.decode(ids) == s
    assert tok.vocab_size == 49152
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.eot_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_end|>")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id, tok.stop_ids) == (1, 2, 2, 2, (2,))
    assert tok.token_to_id("<|endoftext|>") == 0


@pytest.mark.slow  # the real SmolLM2 tokenizer (read from the 98 MB GGUF)
def test_smollm2_equals_transformers(smollm2_path, smollm2_source):
    """Every string: equal to transformers' GGUF tokenizer once that one splits digits first (transformers 5.24 has
    no "smollm" entry and falls back to the plain GPT-2 regex); without the fix the two differ only where a
    whitespace run meets a digit ("  1": llama.cpp and SmolLM2's tokenizer.json give "ĠĠ" "1", the plain regex
    "Ġ" "Ġ1" -> "Ġ" "Ġ" "1")."""
    import re

    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    ours = HFTokenizer.from_files(smollm2_source.files)
    plain = {s: theirs(s, add_special_tokens=False)["input_ids"] for s in STRINGS}
    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    differ = []
    for s in STRINGS:
        ids = ours.encode(s)
        assert ids == theirs(s, add_special_tokens=False)["input_ids"], repr(s)
        assert ours.decode(ids) == theirs.decode(ids) == s, repr(s)
        if ids != plain[s]:
            differ.append(s)
            assert re.search(r"\s{2,}\d", s), repr(s)
    assert differ  # the strings do exercise the difference
