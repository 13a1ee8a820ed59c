"""Tiny pretrained sources built by the tests themselves: Hugging Face folders from random transformers models, a
byte-level BPE vocabulary trained on a few lines, and a GGUF file written with gguf.GGUFWriter the way llama.cpp's
converter writes one (q/k rows permuted, some tensors quantized). transformers is the oracle, never the subject."""

from __future__ import annotations

import json

import numpy as np
import pytest

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! hello, World?  12345 67",
          "def f(x):\n    return x * 2\n", "Sleeping models remember: the state is written while they sleep.",
          "caf\u00e9 na\u00efve \u00fcber \u6f22\u5b57 \U0001f600", "  leading spaces\tand\ttabs\n\nnew lines"] * 4


def hf_config(model_type: str, **overrides):
    """A transformers config object (imported lazily: transformers is a dev-only oracle)."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    kwargs = dict(TINY, **overrides)
    if model_type == "mistral":
        kwargs.setdefault("sliding_window", None)
    return cls(**kwargs)


def hf_model(model_type: str = "llama", seed: int = 0, **overrides):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(model_type, **overrides))
    with torch.no_grad():  # random norms too, so that every tensor is distinguishable
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith(".bias"):
                p.normal_()
    return model.eval()


def state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture
def make_hf_folder(tmp_path):
    """(model, folder) for a random tiny model saved with save_pretrained (safetensors)."""
    counter = iter(range(1000))

    def make(model_type="llama", *, dtype=None, max_shard_size=None, **overrides):
        import torch

        model = hf_model(model_type, **overrides)
        if dtype is not None:
            model = model.to(getattr(torch, dtype))
        folder = tmp_path / f"{model_type}{next(counter)}"
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(folder, **kwargs)
        return model, folder

    return make


@pytest.fixture(scope="session")
def tiny_bpe():
    """(tokenizer.json text, tokens in id order, merges as "a b") of a byte-level BPE trained on CORPUS."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tok.to_str(), tokens, merges


def write_tiny_gguf(path, model, tokens, merges, *, quantize=("attn_q", "ffn_up"), pre="gpt-2",
                    architecture="llama", tokenizer_model="gpt2", chat_template=CHATML):
    """A GGUF as llama.cpp's converter writes one: llama keys, reversed shapes, q/k rows permuted."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize as gguf_quantize

    from convert.gguf import HF_TO_GGUF, permute_qk

    cfg = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)
    for name, value in state_numpy(model).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        key = name
        layer = None
        if name.startswith("model.layers."):
            layer = name.split(".")[2]
            key = name.replace(f"layers.{layer}.", "layers.{}.", 1)
        gname = HF_TO_GGUF[key].format(layer) if layer is not None else HF_TO_GGUF[key]
        if ".attn_q." in gname:
            value = permute_qk(value, cfg.num_attention_heads)
        elif ".attn_k." in gname:
            value = permute_qk(value, cfg.num_key_value_heads)
        kind = next((q for q in quantize if f".{q}." in gname), None)
        if kind is not None:
            w.add_tensor(gname, gguf_quantize(value, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif gname == "output.weight":
            w.add_tensor(gname, value.astype(np.float16))
        else:
            w.add_tensor(gname, value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path, tiny_bpe):
    """(transformers model, path) of a tiny untied llama GGUF with a ChatML template."""
    pytest.importorskip("transformers")
    _, tokens, merges = tiny_bpe
    model = hf_model("llama", seed=1, vocab_size=len(tokens))
    return model, write_tiny_gguf(tmp_path / "tiny.gguf", model, tokens, merges)


SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_path():
    from convert.sources import bundled_path

    try:
        return bundled_path(SMOLLM2)
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_source(smollm2_path):
    """The bundled SmolLM2 GGUF's tokenizer files and architecture (tensors not loaded: ~5 s)."""
    pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from convert.gguf import read_gguf

    return read_gguf(smollm2_path, load_tensors=False, hash_file=False)
