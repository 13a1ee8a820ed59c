"""HybridLM.for_inference (both backends): the inference weight layout of layers.LinearPack gives the
default layout's numbers, costs no memory, and never serves stale weights."""

import numpy as np
import pytest

from common.config import ModelConfig

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
import sleep_mlx  # noqa: E402
import sleep_torch  # noqa: E402

BACKENDS = {"torch": (sleep_torch, lambda a: torch.tensor(a)), "mlx": (sleep_mlx, lambda a: mx.array(a))}
CONFIGS = {  # every LinearPack shape: GQA, q/k/v biases, q/k norm, untied head, MLP-free SSM blocks, and
    # (gqa-rows) torch's q/k/v pack in the default layout (fewer than 2x as many outputs as inputs)
    "gqa-tied": dict(pattern="ASA", n_layers=3, n_heads=4, n_kv_heads=2, window=6, eviction="sliding"),
    "bias-untied": dict(pattern="AAS", n_layers=3, attn_bias=True, tie_embeddings=False, window=5),
    "gqa-rows": dict(pattern="AS", n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, mlp_hidden=64, window=5),
    "qknorm-ssm-no-mlp": dict(pattern="ASSA", n_layers=4, qk_norm=True, ssm_mlp=False, window=5, sleep_passes=3),
}
TOKENS = np.random.default_rng(0).integers(0, 16, (1, 17))


def _np(x):
    return np.array(x.detach().float().numpy() if isinstance(x, torch.Tensor) else x.astype(mx.float32))


def _stream(model, conv, tokens, decode: int = 9):
    """Logits of a prompt (last token) and then `decode` one-token steps fed greedily: across sleeps."""
    state, outs = model.new_state(1), []
    logits, _ = model.step(conv(tokens), state, last=True)
    outs.append(_np(logits[:, -1]))
    for _ in range(decode):
        token = int(outs[-1].argmax())
        logits, _ = model.step(conv([[token]]), state, last=True)
        outs.append(_np(logits[:, -1]))
    return np.stack(outs), state


def _bias_and_weights(model, seed: int) -> dict:
    """Random values for every parameter (the init leaves q/k/v biases and some gates at zero)."""
    rng = np.random.default_rng(seed)
    params = model.named_parameters() if hasattr(model, "named_parameters") else None
    if params is None:
        from mlx.utils import tree_flatten
        params = tree_flatten(model.parameters())
    return {name: (rng.standard_normal(tuple(p.shape)) * 0.2).astype(np.float32) for name, p in params}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_inference_layout_gives_the_default_numbers(backend, name):
    pkg, conv = BACKENDS[backend]
    config = ModelConfig.from_name("debug", **CONFIGS[name])
    plain, packed = pkg.HybridLM(config, seed=1), pkg.HybridLM(config, seed=1)
    weights = _bias_and_weights(plain, 5)
    plain.load_arrays(weights)
    packed.load_arrays(weights)
    assert packed.for_inference() is packed
    with torch.no_grad():
        want, state_a = _stream(plain, conv, TOKENS)
        got, state_b = _stream(packed, conv, TOKENS)
    assert state_a.sleeps == state_b.sleeps >= 2
    if backend == "mlx":  # the same products in another layout: bit-equal on mlx[cpu]
        np.testing.assert_array_equal(got, want)
    else:  # MKL sums in another order for one-token products: float rounding only
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    for a, b in zip(state_a.tensors(), state_b.tensors()):
        np.testing.assert_allclose(_np(b), _np(a), rtol=1e-5, atol=1e-5)


def _storages(model) -> set:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def test_torch_layout_costs_no_memory_and_sees_later_writes():
    config = ModelConfig.from_name("debug", **CONFIGS["gqa-tied"])
    model = sleep_torch.HybridLM(config, seed=1)
    before = sum(p.numel() for p in model.parameters())
    model.for_inference()
    storages = {}
    for p in model.parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    assert sum(storages.values()) == before * 4  # packed buffers hold exactly the parameters, once
    assert len(storages) < len(list(model.parameters()))  # and parameters share them
    # load_arrays writes through the views: the packed product uses the new weights
    fresh = sleep_torch.HybridLM(config, seed=9)
    model.load_arrays({n: p.detach() for n, p in fresh.named_parameters()})
    with torch.no_grad():
        want, _ = _stream(fresh, torch.tensor, TOKENS, decode=3)
        got, _ = _stream(model, torch.tensor, TOKENS, decode=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_torch_layout_survives_to_and_training():
    config = ModelConfig.from_name("debug", **CONFIGS["bias-untied"])
    model, ref = sleep_torch.HybridLM(config, seed=2).for_inference(), sleep_torch.HybridLM(config, seed=2)
    # new storage (dtype change): the packs are let go, the layers run one by one, numbers still right
    model.double()
    ref.double()
    with torch.no_grad():
        want, _ = _stream(ref, torch.tensor, TOKENS, decode=2)
        got, _ = _stream(model, torch.tensor, TOKENS, decode=2)
    assert all(pack.weight is None for block in model.layers for pack in vars(block.attn if block.kind == "A"
                                                                                else block.ssm).values()
               if isinstance(pack, sleep_torch.layers.LinearPack))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # gradients under autograd: the layers run one by one on their (view) parameters
    model, ref = sleep_torch.HybridLM(config, seed=2).for_inference(), sleep_torch.HybridLM(config, seed=2)
    model.requires_grad_(True)
    for m in (model, ref):
        m(torch.tensor(TOKENS)).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_folder_and_memory_files_do_not_change(backend, tmp_path):
    pkg, conv = BACKENDS[backend]
    config = ModelConfig.from_name("debug", **CONFIGS["qknorm-ssm-no-mlp"])
    model = pkg.HybridLM(config, seed=4)
    pkg.save(model, tmp_path / "plain")
    fingerprint = model.fingerprint()
    model.for_inference()
    pkg.save(model, tmp_path / "packed")
    assert model.fingerprint() == fingerprint  # memory files written before still load
    assert (tmp_path / "plain" / "config.json").read_bytes() == (tmp_path / "packed" / "config.json").read_bytes()
    # (not the .safetensors bytes: safetensors 0.8 writes its __metadata__ keys in a random order)
    from safetensors.numpy import load_file
    plain, packed = (load_file(tmp_path / f / "model.safetensors") for f in ("plain", "packed"))
    assert plain.keys() == packed.keys()
    for name in plain:
        assert plain[name].dtype == packed[name].dtype and np.array_equal(plain[name], packed[name]), name


def test_mlx_pack_is_let_go_when_weights_are_replaced():
    config = ModelConfig.from_name("debug", **CONFIGS["gqa-tied"])
    model = sleep_mlx.HybridLM(config, seed=1).for_inference()
    fresh = sleep_mlx.HybridLM(config, seed=9)
    from mlx.utils import tree_flatten
    model.load_arrays(dict(tree_flatten(fresh.parameters())))
    want, _ = _stream(fresh, mx.array, TOKENS, decode=3)
    got, _ = _stream(model, mx.array, TOKENS, decode=3)
    np.testing.assert_array_equal(got, want)
    assert model.layers[0].attn.qkv.weight is None  # the stale packed array is not kept alive


def test_mlx_quantized_layers_are_left_alone():
    import mlx.nn as nn

    config = ModelConfig.from_name("debug", d_model=64, mlp_hidden=128, **CONFIGS["gqa-tied"])
    model = sleep_mlx.HybridLM(config, seed=1)
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda _, m: isinstance(m, nn.Linear))
    want, _ = _stream(model, mx.array, TOKENS, decode=3)
    got, _ = _stream(model.for_inference(), mx.array, TOKENS, decode=3)
    np.testing.assert_array_equal(got, want)
