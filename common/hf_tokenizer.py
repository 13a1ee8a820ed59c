"""A pretrained tokenizer: a Hugging Face tokenizer.json run by the `tokenizers` library (the "hf" extra).

Same small interface as common/tokenizers.py (`encode`, `decode`, `vocab_size`, `token_to_id`, `to_dict`), plus
the special ids a chat needs: `bos_id`, `eos_id`, `pad_id` and `eot_id` (the token that ends an assistant turn,
e.g. "<|im_end|>" for ChatML templates, "<|eot_id|>" for Llama 3), and `stop_ids` (every id that ends generation).
The tokenizer.json itself lives beside config.json in a model folder; the config's "tokenizer" block only points
to it: `{"type": "hf", "file": "tokenizer.json", "bos_token": ..., "eos_token": ..., "pad_token": ...,
"eot_token": ..., "stop_tokens": [...]}`, read back by `HFTokenizer.from_dict(block, folder)`.

`tokenizers` is imported when a tokenizer is built, never by `import common`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

# Turn-ending tokens of common chat formats, tried in this order when the files do not name one.
EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def _token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A tokenizers.Tokenizer with named special tokens (each None when the model has none)."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, eot_token: str | None = None, stop_tokens=(),
                 file: str = "tokenizer.json"):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("the 'hf' tokenizer needs the tokenizers package: pip install 'lm-sleep[hf]'") from None
        try:
            self._tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises its own Exception type for malformed JSON
            raise ValueError(f"{file}: not a readable tokenizer.json ({(str(e).splitlines() or [''])[0]})") from None
        self._json = tokenizer_json
        self.file = file
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.eot_token = eot_token if eot_token is not None else eos_token
        for name in ("bos_token", "eos_token", "pad_token", "eot_token"):
            token = getattr(self, name)
            if token is not None and self._tok.token_to_id(token) is None:
                raise ValueError(f"{file}: {name} {token!r} is not in the vocabulary")
        self.stop_tokens = tuple(dict.fromkeys(
            [t for t in (self.eot_token, self.eos_token) if t is not None] + list(stop_tokens)))
        for token in self.stop_tokens:
            if self._tok.token_to_id(token) is None:
                raise ValueError(f"{file}: stop token {token!r} is not in the vocabulary")

    # ------------------------------------------------------------ building

    @classmethod
    def from_files(cls, files: Mapping[str, str], *, chat_template: str | None = None,
                   generation_config: Mapping | None = None) -> "HFTokenizer":
        """From a model's tokenizer files as text ({"tokenizer.json": ..., "tokenizer_config.json": ...}).

        Special tokens come from tokenizer_config.json; the end-of-turn token is the first of EOT_CANDIDATES that
        the vocabulary has and the chat template writes (else eos); generation_config.json's eos_token_id list
        (Llama 3 instruct stops on several) adds stop tokens."""
        if "tokenizer.json" not in files:
            raise ValueError("no tokenizer.json among the model's files (only tokenizer.json tokenizers are read)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError("the 'hf' tokenizer needs the tokenizers package: pip install 'lm-sleep[hf]'") from None
        config = json.loads(files.get("tokenizer_config.json") or "{}")
        if generation_config is None and "generation_config.json" in files:
            generation_config = json.loads(files["generation_config.json"])
        try:
            vocab = Tokenizer.from_str(files["tokenizer.json"])
        except Exception as e:  # tokenizers raises its own Exception type for malformed JSON
            raise ValueError(f"tokenizer.json: not readable ({(str(e).splitlines() or [''])[0]})") from None
        eot = None
        if chat_template:
            eot = next((t for t in EOT_CANDIDATES if t in chat_template and vocab.token_to_id(t) is not None), None)
        eos_ids = (generation_config or {}).get("eos_token_id")
        eos_ids = [] if eos_ids is None else eos_ids if isinstance(eos_ids, list) else [eos_ids]
        stops = [t for t in (vocab.id_to_token(int(i)) for i in eos_ids) if t is not None]
        return cls(files["tokenizer.json"], bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")), pad_token=_token_text(config.get("pad_token")),
                   eot_token=eot, stop_tokens=stops)

    @classmethod
    def from_dict(cls, d: Mapping, folder: str | os.PathLike) -> "HFTokenizer":
        """Inverse of to_dict(): the config.json block, with the model folder holding the tokenizer file."""
        allowed = {"type", "file", "bos_token", "eos_token", "pad_token", "eot_token", "stop_tokens"}
        if d.get("type") != cls.kind:
            raise ValueError(f"tokenizer block type {d.get('type')!r} is not {cls.kind!r}")
        extra = sorted(set(d) - allowed)
        if extra:
            raise ValueError(f"unknown key(s) {extra} in 'hf' tokenizer block")
        name = d.get("file", "tokenizer.json")
        if not isinstance(name, str) or os.path.isabs(name) or ".." in Path(name).parts or "/" in name:
            raise ValueError(f"'hf' tokenizer block: file {name!r} must be a file name inside the model folder")
        path = Path(folder) / name
        if not path.is_file():
            raise ValueError(f"{path}: missing (the 'hf' tokenizer block points to it)")
        return cls(path.read_text(encoding="utf-8"), bos_token=d.get("bos_token"), eos_token=d.get("eos_token"),
                   pad_token=d.get("pad_token"), eot_token=d.get("eot_token"), stop_tokens=d.get("stop_tokens", ()),
                   file=name)

    def to_dict(self) -> dict:
        return {"type": self.kind, "file": self.file, "bos_token": self.bos_token, "eos_token": self.eos_token,
                "pad_token": self.pad_token, "eot_token": self.eot_token, "stop_tokens": list(self.stop_tokens)}

    def to_json(self) -> str:
        """The tokenizer.json text to write beside config.json."""
        return self._json

    # ------------------------------------------------------------ the tokenizer interface

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included (the model's embedding may be larger: padded vocabularies)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, symbol: str, default=...) -> int:
        i = self._tok.token_to_id(symbol)
        if i is None:
            if default is not ...:
                return default
            raise ValueError(f"unknown token {symbol!r}")
        return i

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text. Special tokens written in the text ("<|im_start|>") become their ids, as in
        transformers. add_special_tokens=True also applies the post-processor (a BOS for Llama-style files)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = np.asarray(ids).reshape(-1).tolist()
        n = self._tok.get_vocab_size(with_added_tokens=True)
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {n})")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def _id(self, token):
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def eot_id(self) -> int | None:
        return self._id(self.eot_token)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(self._tok.token_to_id(t) for t in self.stop_tokens)

    def special_tokens(self) -> dict[str, str]:
        """The names chat templates read (bos_token, eos_token, pad_token), those that are set."""
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("pad_token", self.pad_token)) if v is not None}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.vocab_size} tokens, eos={self.eos_token!r}, eot={self.eot_token!r})"


__all__ = ["HFTokenizer", "EOT_CANDIDATES"]
