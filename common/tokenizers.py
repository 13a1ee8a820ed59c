"""Tokenizers: a symbol vocabulary for the synthetic tasks and a byte-level one for text.

Both kinds share the same small interface: `encode(str) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `token_to_id(symbol)` and `to_dict()`; `tokenizer_from_dict(d)` rebuilds either
kind from the "tokenizer" block of config.json.

CharTokenizer splitting rule (attribute `sep`):
- sep == "":  every symbol is a single character and a string is read character by character
              ("0110|1" -> 6 tokens). Chosen automatically when all symbols are one character.
- sep == " ": symbols may be any non-empty strings without whitespace ("n3", "->", "h12") and a
              string is split on whitespace ("n3 -> n7 ," -> 4 tokens); decode joins with one space.
              Chosen automatically as soon as one symbol is longer than one character.
decode(encode(s)) == s for every well-formed s: any string of known characters (sep ""), or known
symbols separated by single spaces without leading/trailing whitespace (sep " ").
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

_WORD = re.compile(r"\S+")


class CharTokenizer:
    """A fixed list of symbols; token id = index in the list."""

    kind = "char"

    def __init__(self, symbols: Iterable[str], sep: str | None = None):
        symbols = list(symbols)
        if not symbols:
            raise ValueError("CharTokenizer: symbols must not be empty")
        for i, s in enumerate(symbols):
            if not isinstance(s, str) or not s:
                raise ValueError(f"CharTokenizer: symbol {i} is {s!r}; symbols must be non-empty strings")
        if len(set(symbols)) != len(symbols):
            dups = sorted({s for s in symbols if symbols.count(s) > 1})
            raise ValueError(f"CharTokenizer: duplicate symbols {dups}")
        if sep is None:
            sep = "" if all(len(s) == 1 for s in symbols) else " "
        if sep == "":
            long = [s for s in symbols if len(s) != 1]
            if long:
                raise ValueError(f"CharTokenizer: sep='' needs single-character symbols, got {long[:5]}")
        elif sep == " ":
            spaced = [s for s in symbols if _WORD.fullmatch(s) is None]
            if spaced:
                raise ValueError(f"CharTokenizer: sep=' ' needs symbols without whitespace, got {spaced[:5]}")
        else:
            raise ValueError(f"CharTokenizer: sep must be '' or ' ', got {sep!r}")
        self.symbols = symbols
        self.sep = sep
        self._ids = {s: i for i, s in enumerate(symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def token_to_id(self, symbol: str) -> int:
        if symbol not in self._ids:
            raise ValueError(f"unknown symbol {symbol!r} (vocabulary: {self._preview()})")
        return self._ids[symbol]

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        if self.sep == "":
            for pos, ch in enumerate(text):
                if ch not in ids:
                    raise ValueError(f"unknown character {ch!r} at position {pos} "
                                     f"(vocabulary: {self._preview()})")
            return [ids[ch] for ch in text]
        out = []
        for index, match in enumerate(_WORD.finditer(text)):
            word = match.group()
            if word not in ids:
                raise ValueError(f"unknown symbol {word!r} at token {index} (character {match.start()}) "
                                 f"(vocabulary: {self._preview()})")
            out.append(ids[word])
        return out

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < len(self.symbols)]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {len(self.symbols)})")
        return self.sep.join(self.symbols[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": self.kind, "symbols": list(self.symbols), "sep": self.sep}

    def _preview(self) -> str:
        shown = " ".join(repr(s) for s in self.symbols[:12])
        return shown + (f" ... ({len(self.symbols)} symbols)" if len(self.symbols) > 12 else "")

    def __repr__(self) -> str:
        return f"CharTokenizer({len(self.symbols)} symbols, sep={self.sep!r})"


class ByteTokenizer:
    """UTF-8 bytes 0..255 as ids 0..255, then the special tokens: 256 = "<eot>", 257 = "<pad>"."""

    kind = "byte"
    SPECIALS = ("<eot>", "<pad>")

    def __init__(self):
        self.eot_id = 256  # end of text: separates documents
        self.pad_id = 257

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.SPECIALS)

    def token_to_id(self, symbol: str) -> int:
        if symbol in self.SPECIALS:
            return 256 + self.SPECIALS.index(symbol)
        data = symbol.encode("utf-8") if isinstance(symbol, str) else b""
        if len(data) != 1:
            raise ValueError(f"ByteTokenizer: {symbol!r} is neither a special token {self.SPECIALS} "
                             "nor a single-byte character")
        return data[0]

    def encode(self, text: str) -> list[int]:
        """Plain UTF-8 bytes; special tokens are never produced from text (add eot_id yourself)."""
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special: bool = False) -> str:
        """Bytes are decoded with errors="replace" (a cut multi-byte character becomes U+FFFD);
        specials are written by name ("<eot>") or dropped with skip_special=True."""
        ids = np.asarray(ids).reshape(-1).tolist()
        parts, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            if not 256 <= i < self.vocab_size:
                raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special:
                parts.append(self.SPECIALS[i - 256])
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def to_dict(self) -> dict:
        return {"type": self.kind}

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def tokenizer_from_dict(d: dict, folder=None):
    """Inverse of `to_dict()` for any kind (the "tokenizer" block of config.json).

    The "hf" kind (a pretrained tokenizer.json, common.hf_tokenizer) reads its file from `folder`.
    """
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"tokenizer block must be a dict with a 'type' key, got {d!r}")
    kind = d["type"]
    if kind == "hf":
        from common.hf_tokenizer import HFTokenizer

        if folder is None:
            raise ValueError("an 'hf' tokenizer block needs the model folder that holds its tokenizer.json")
        return HFTokenizer.from_dict(d, folder)
    allowed = {"char": {"type", "symbols", "sep"}, "byte": {"type"}}
    if kind not in allowed:
        raise ValueError(f"unknown tokenizer type {kind!r} (known: {sorted(allowed) + ['hf']})")
    extra = sorted(set(d) - allowed[kind])
    if extra:
        raise ValueError(f"unknown key(s) {extra} in {kind!r} tokenizer block")
    if kind == "byte":
        return ByteTokenizer()
    if "symbols" not in d:
        raise ValueError("char tokenizer block needs 'symbols'")
    return CharTokenizer(d["symbols"], sep=d.get("sep"))


__all__ = ["CharTokenizer", "ByteTokenizer", "tokenizer_from_dict"]
