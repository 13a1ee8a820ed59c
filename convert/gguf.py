"""Read a llama-architecture GGUF file (llama.cpp's format) as a retrofit source: the same Source as convert.hf.

    source = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    source.arch                 # common.pretrained.SourceArch (model_type "llama")
    source.tensors              # Hugging Face names, float32, dequantized, q/k rows back in Hugging Face order
    source.files                # tokenizer.json (built with `tokenizers`), tokenizer_config.json, chat_template.jinja

Weights: every type gguf.quants can dequantize (F32, F16, BF16, Q4_0, Q4_1, Q8_0, k-quants...). A GGUF lists its
dimensions fastest-first, so a [out, in] matrix is stored with shape (in, out): the numpy array is read reversed.
llama.cpp's converter permutes the rows of q_proj and k_proj so that its interleaved rotary (pairs (2i, 2i+1))
equals Hugging Face's rotate-half rotary (pairs (i, i + d/2)): per head, row (i, half) of the Hugging Face layout
[heads, 2, d/2] is stored at (i, half) of [heads, d/2, 2]. `unpermute_qk` undoes it (k uses the KV head count),
as transformers' GGUF loader does.

Tokenizer: only byte-level BPE vocabularies (tokenizer.ggml.model "gpt2") are rebuilt, with the pre-tokenizer
llama.cpp uses for the file's tokenizer.ggml.pre; sentencepiece ("llama") and others are refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from common import validate
from common.pretrained import RopeScaling, SourceArch, check_hf_tensors, expected_hf_shapes
from convert.hf import Source

# GGUF tensor name -> Hugging Face name ("{}" = layer), llama.cpp's llama tensor names
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
HF_TO_GGUF = {v: k for k, v in GGUF_TO_HF.items()}

# tokenizer.ggml.pre -> pre-tokenizer (llama.cpp's llama-vocab.cpp groups)
_GPT2_PRE = ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais")
_DIGITS_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _read(path: Path):
    from gguf import GGUFReader

    validate.regular_file(path, None, "GGUF file")  # lstat first: a FIFO or a device is never opened
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf reader raises ValueError/IndexError/struct errors on short or foreign files
        raise ValueError(f"{path.name}: not a readable GGUF file ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}; truncated?)") from None
    _check_tensor_bounds(reader, path)
    return reader


def _check_tensor_bounds(reader, path: Path) -> None:
    """Every tensor's data lies inside the file's data section, its element count is the product of its
    dimensions (computed without overflow), and no two tensors overlap."""
    size = path.stat().st_size
    spans = []
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        if int(t.n_elements) != math.prod(dims) or len(dims) > validate.MAX_DIMS:
            raise ValueError(f"{path.name}: tensor {t.name!r} has dimensions {dims[:8]} that do not match its "
                             f"{int(t.n_elements)} elements")
        begin, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        if not 0 <= begin <= end <= size:
            raise ValueError(f"{path.name}: tensor {t.name!r} lies beyond the end of the file (truncated file?)")
        spans.append((begin, end, t.name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise ValueError(f"{path.name}: tensors {a!r} and {b!r} overlap in the file")


def _meta(reader) -> dict:
    """Every metadata field as a Python value (arrays as lists)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = f.contents()
    return out


def _arch(meta: dict, tensor_names: set[str], path: Path) -> SourceArch:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path.name}: general.architecture={arch!r}: only 'llama' GGUF files are read")

    def get(key, default=None, required=True):
        value = meta.get(f"llama.{key}", default)
        if value is None and required:
            raise ValueError(f"{path.name}: metadata llama.{key} is missing")
        return value

    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{path.name}: tensor rope_freqs.weight (llama3 rotary scaling as per-frequency factors) "
                         "is not supported")
    scaling = RopeScaling()
    kind = get("rope.scaling.type", "none", required=False)
    if kind == "linear":
        scaling = RopeScaling("linear", factor=float(get("rope.scaling.factor")))
    elif kind not in ("none", None):
        raise ValueError(f"{path.name}: llama.rope.scaling.type={kind!r}: unknown rotary scaling (supported: linear)")
    d, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise ValueError(f"{path.name}: llama.attention.head_count_kv is per layer: not supported")
    head_dim = int(get("attention.key_length", d // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"{path.name}: llama.attention.value_length differs from key_length: not supported")
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise ValueError(f"{path.name}: llama.rope.dimension_count={rot}: only full-width rotary "
                         f"(head_dim {head_dim}) is supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if tokens is not None else None)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return SourceArch(
        model_type="llama", vocab_size=int(vocab), hidden_size=d, n_layers=int(get("block_count")), n_heads=n_heads,
        n_kv_heads=int(n_kv), head_dim=head_dim, intermediate_size=int(get("feed_forward_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0, required=False)), rope_scaling=scaling,
        attn_bias="blk.0.attn_q.bias" in tensor_names, tie_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (int(eos),),
        max_position_embeddings=get("context_length", required=False))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows stored as [d/2, 2] go back to [2, d/2]."""
    rows = w.shape[0]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])  # (H, d/2, 2, ...)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])            # (H, 2, d/2, ...) -> (H*d, ...)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (Hugging Face -> GGUF order); the inverse of unpermute_qk."""
    rows = w.shape[0]
    w = w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])  # (H, 2, d/2, ...)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        key = ".".join(["blk", "{}"] + parts[2:])
        if key in GGUF_TO_HF:
            return GGUF_TO_HF[key].format(int(parts[1]))
        if key in ("blk.{}.attn_q.bias", "blk.{}.attn_k.bias", "blk.{}.attn_v.bias"):
            proj = parts[2][len("attn_"):]
            return f"model.layers.{parts[1]}.self_attn.{proj}_proj.bias"
    elif gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    raise ValueError(f"unknown GGUF tensor {gguf_name!r} for a llama model")


def _dequantize(t) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        values = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise ValueError(f"tensor {t.name!r}: GGML type {GGMLQuantizationType(t.tensor_type).name} cannot be "
                         "dequantized by the gguf package") from None
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions fastest-first
    return np.asarray(values, dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------- tokenizer

def _pre_tokenizer(pre: str | None, path: Path):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE or pre is None:
        return byte_level
    if pre in _DIGITS_GPT2_PRE:  # llama.cpp: "\p{N}" split first, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"{path.name}: tokenizer.ggml.pre={pre!r}: unknown pre-tokenizer (known: "
                     f"{', '.join(_GPT2_PRE + _DIGITS_GPT2_PRE + _LLAMA3_PRE)})")


def build_tokenizer_json(meta: dict, path: Path) -> str:
    """tokenizer.json text for the file's byte-level BPE vocabulary (tokenizers.Tokenizer.to_str())."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path.name}: tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') vocabularies "
                         "are rebuilt")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = meta.get("tokenizer.ggml.pre")
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                     ignore_merges=pre in _LLAMA3_PRE)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(pre, path)
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>...) and user-defined ones are matched whole, before pre-tokenization
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1",
                                                           special_tokens=[(b, bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def _tokenizer_config(meta: dict) -> dict:
    tokens = meta.get("tokenizer.ggml.tokens", [])

    def name(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos_token_id"),
              "eos_token": name("eos_token_id"), "pad_token": name("padding_token_id"),
              "unk_token": name("unknown_token_id"),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
              "clean_up_tokenization_spaces": False}
    if meta.get("llama.context_length"):
        config["model_max_length"] = int(meta["llama.context_length"])
    return config


# ---------------------------------------------------------------- the file

def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_gguf(path: str | os.PathLike, *, load_tensors: bool = True, tokenizer: bool = True,
              hash_file: bool = True) -> Source:
    """A llama GGUF as a Source: SourceArch, HF-named float32 tensors, tokenizer.json/tokenizer_config.json and
    chat_template.jinja (when the file has tokenizer.chat_template); one-line ValueError for anything else."""
    path = Path(path)
    if not os.path.lexists(path):
        raise ValueError(f"{path}: no such file")
    reader = _read(path)
    meta = _meta(reader)
    by_name = {t.name: t for t in reader.tensors}
    arch = _arch(meta, set(by_name), path)
    names = {_hf_name(n): n for n in by_name}
    check_hf_tensors(arch, {hf: tuple(int(x) for x in reversed(by_name[g].shape)) for hf, g in names.items()})
    tensors = {}
    if load_tensors:
        for hf in expected_hf_shapes(arch):
            w = _dequantize(by_name[names[hf]])
            if not np.isfinite(w).all():
                raise ValueError(f"{path.name}: tensor {names[hf]!r} holds NaN or infinite values")
            if hf.endswith("self_attn.q_proj.weight") or hf.endswith("self_attn.q_proj.bias"):
                w = unpermute_qk(w, arch.n_heads)
            elif hf.endswith("self_attn.k_proj.weight") or hf.endswith("self_attn.k_proj.bias"):
                w = unpermute_qk(w, arch.n_kv_heads)
            tensors[hf] = w
    files = {}
    if tokenizer:
        files["tokenizer.json"] = build_tokenizer_json(meta, path)
        files["tokenizer_config.json"] = json.dumps(_tokenizer_config(meta), indent=2) + "\n"
        template = meta.get("tokenizer.chat_template")
        if template:
            files["chat_template.jinja"] = template
    origin = {"format": "gguf", "path": str(path), "file_type": meta.get("general.file_type")}
    if hash_file:
        origin["sha256"] = file_sha256(path)
    return Source(arch=arch, tensors=tensors, files=files, origin=origin)


__all__ = ["read_gguf", "build_tokenizer_json", "unpermute_qk", "permute_qk", "GGUF_TO_HF", "HF_TO_GGUF"]
