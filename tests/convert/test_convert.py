"""convert/: bit-exact torch <-> MLX folder conversion, dtype casts, quantization, training checkpoints,
one-line errors that leave every file untouched, and the `lmsleep convert` / `lmsleep parity` commands.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from click.testing import CliRunner  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import sleep_mlx  # noqa: E402
import sleep_torch  # noqa: E402
from common import checkpoint as ckpt  # noqa: E402
from common import training as tr  # noqa: E402
from common.config import TRAIN_PRESETS, ModelConfig  # noqa: E402
from common.tasks import make  # noqa: E402
from convert import quantize as qz  # noqa: E402
from convert.convert import convert_model, convert_training_checkpoint, detect, strip_prefixes  # noqa: E402
from convert.dtypes import Raw, bf16_bits_to_f32, cast, f32_to_bf16_bits, read_raw, write_raw  # noqa: E402
from lmsleep.cli import cli  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

CONFIG = ModelConfig.from_name("debug", n_layers=4, eviction="sliding")  # d_model 32: group size 32 fits


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture
def torch_dir(tmp_path):
    sleep_torch.save(sleep_torch.HybridLM(CONFIG, seed=3), tmp_path / "torch")
    return tmp_path / "torch"


def raw_tensors(folder) -> dict[str, Raw]:
    out = {}
    for f in ckpt.weight_files(folder):
        out.update(read_raw(f)[0])
    return out


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- dtypes ------------------------------------------------------------------------------------------

def special_floats() -> np.ndarray:
    rng = np.random.default_rng(0)
    ties = (rng.integers(0, 1 << 16, 2000, dtype=np.uint32) << 16) | 0x8000  # exactly halfway: ties to even
    near = (rng.integers(0, 1 << 16, 2000, dtype=np.uint32) << 16) | rng.choice([0x7FFF, 0x8001, 0x0001, 0xFFFF], 2000)
    edge = np.array([0, 0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000,
                     0x7F800000, 0xFF800000, 0x3F808000, 0x3F818000], dtype=np.uint32)
    anything = rng.integers(0, 1 << 32, 20000, dtype=np.uint64).astype(np.uint32)  # NaNs included
    return np.concatenate([ties, near.astype(np.uint32), edge, anything]).view(np.float32)


def test_bf16_rounding_equals_torch_bit_for_bit():
    x = special_floats()
    ours = f32_to_bf16_bits(x)
    theirs = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert nan.any() and (~nan).sum() > 20000
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_bits_to_f32(ours[nan])).all()  # NaN stays NaN (sign kept)
    assert (np.signbit(bf16_bits_to_f32(ours[nan])) == np.signbit(x[nan])).all()


@pytest.mark.parametrize("pair", ["F32>BF16", "F32>F16", "BF16>F16", "F16>BF16", "BF16>F32", "F16>F32"])
def test_casts_equal_torch(pair):
    src, dst = pair.split(">")
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(4096).astype(np.float32) * 300).to(names[src])
    raw = Raw(src, (4096,), x.view(torch.int16 if src != "F32" else torch.int32).numpy().tobytes())
    expected = x.to(names[dst]).view(torch.int16 if dst != "F32" else torch.int32).numpy().tobytes()
    assert cast(raw, dst).data == expected


def test_writer_output_reads_in_both_backends(tmp_path):
    tensors = {"a": Raw("BF16", (3,), b"\x80\x3f\x00\x40\x40\x40"), "b": Raw("F32", (2,), np.float32([1, 2]).tobytes()),
               "c": Raw("U32", (1, 1), np.uint32([7]).tobytes())}
    write_raw(tmp_path / "x.safetensors", tensors, {"format": "lm-sleep"})
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "x.safetensors"))
    assert t["a"].tolist() == [1.0, 2.0, 3.0] and t["b"].tolist() == [1.0, 2.0] and t["c"].tolist() == [[7]]
    m = mx.load(str(tmp_path / "x.safetensors"))
    assert m["a"].dtype == mx.bfloat16 and m["a"].tolist() == [1.0, 2.0, 3.0]
    assert read_raw(tmp_path / "x.safetensors") == (tensors, {"format": "lm-sleep"})


# --- model folders -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,shard", [("float32", None), ("bfloat16", None), ("bfloat16", 20000)],
                         ids=["float32", "bfloat16", "bfloat16-sharded"])
def test_round_trip_is_bit_exact(tmp_path, dtype, shard):
    model = sleep_torch.HybridLM(CONFIG, seed=3)
    sleep_torch.save(model, tmp_path / "t", dtype=dtype, shard_size=shard)
    convert_model(tmp_path / "t", tmp_path / "m", to="mlx")
    convert_model(tmp_path / "m", tmp_path / "t2", to="torch")
    original, via_mlx, back = (raw_tensors(tmp_path / d) for d in ("t", "m", "t2"))
    assert original == via_mlx == back  # dtype, shape and bytes of every tensor
    assert [f.name for f in ckpt.weight_files(tmp_path / "t2")] == [f.name for f in ckpt.weight_files(tmp_path / "t")]
    assert {ckpt.read_metadata(f)["backend"] for f in ckpt.weight_files(tmp_path / "m")} == {"mlx"}
    assert {ckpt.read_metadata(f)["backend"] for f in ckpt.weight_files(tmp_path / "t2")} == {"torch"}
    ref = dict(sleep_torch.load(tmp_path / "t").named_parameters())
    for name, p in sleep_torch.load(tmp_path / "t2").named_parameters():
        assert p.dtype == ref[name].dtype and torch.equal(p, ref[name]), name
    for name, a in tree_flatten(sleep_mlx.load(tmp_path / "m").parameters()):
        assert torch.equal(torch.from_numpy(np.array(a.astype(mx.float32))), ref[name].float()), name


def test_dtype_cast_equals_torch_save(tmp_path, torch_dir):
    report = convert_model(torch_dir, tmp_path / "m16", to="mlx", dtype="bfloat16")
    sleep_torch.save(sleep_torch.load(torch_dir), tmp_path / "ref16", dtype="bfloat16")
    assert raw_tensors(tmp_path / "m16") == raw_tensors(tmp_path / "ref16")
    assert report["dtypes"] == ["bfloat16"] and sleep_mlx.load(tmp_path / "m16").embed.weight.dtype == mx.bfloat16
    convert_model(tmp_path / "m16", tmp_path / "t32", to="torch", dtype="float32")  # widening is exact
    wide = raw_tensors(tmp_path / "t32")
    assert all(cast(wide[n], "BF16") == t for n, t in raw_tensors(tmp_path / "m16").items())


# --- quantization ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_numpy_dequantize_equals_mlx(bits, dtype):
    w = (mx.random.normal((24, 256), key=mx.random.key(bits)) * 0.05).astype(getattr(mx, dtype))
    for group in qz.GROUP_SIZES:
        wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        ref = np.array(mx.dequantize(wq, scales, biases, group_size=group, bits=bits).astype(mx.float32))
        tag = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
        out = qz.dequantize(np.array(wq), np.array(scales.astype(mx.float32)), np.array(biases.astype(mx.float32)),
                            bits=bits, group_size=group, dtype=tag)
        np.testing.assert_array_equal(out, ref)


# measured on this debug config (seed 3, 128 random tokens): 4-bit 2.8e-2, 8-bit 1.5e-3 relative logit error
BOUNDS = {4: 0.1, 8: 0.01}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_folder(tmp_path, torch_dir, bits):
    report = convert_model(torch_dir, tmp_path / "q", to="mlx", quantize_bits=bits, group_size=32)
    err = report["quantization_error"]
    print(f"{bits}-bit: {err}")
    assert err["max_rel"] < BOUNDS[bits] and err["greedy_agreement"] >= 0.9
    doc = json.loads((tmp_path / "q" / "config.json").read_text())
    layers = doc["quantization"]["layers"]
    assert doc["quantization"]["bits"] == bits and layers == qz.quantizable_layers(CONFIG, 32)
    assert not any(name.endswith(("a_proj", "b_proj")) for name in layers) and "layers.1.ssm.q_proj" in layers
    model = sleep_mlx.load(tmp_path / "q")
    quantized = {name for name, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert quantized == set(layers)
    # dequantized for torch: the same function as the quantized MLX model computes
    with pytest.raises(ckpt.CheckpointError, match="--dequantize"):
        convert_model(tmp_path / "q", tmp_path / "t", to="torch")
    with pytest.raises(ckpt.CheckpointError, match="dequantize"):
        sleep_torch.load(tmp_path / "q")
    convert_model(tmp_path / "q", tmp_path / "t", to="torch", dequantize=True)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 30))
    with torch.no_grad():
        ref = sleep_torch.load(tmp_path / "t")(torch.as_tensor(tokens))
    assert_close(f"{bits}-bit: torch(dequantized) vs mlx(quantized)", ref, model(mx.array(tokens)), rtol=1e-4)
    with pytest.raises(ValueError, match="already quantized"):
        convert_model(tmp_path / "q", tmp_path / "qq", to="mlx", quantize_bits=4, group_size=32)


def test_quantize_settings_are_checked(tmp_path, torch_dir):
    with pytest.raises(ValueError, match="bits must be one of"):
        convert_model(torch_dir, tmp_path / "q", to="mlx", quantize_bits=3)
    with pytest.raises(ValueError, match="to='mlx'"):
        convert_model(torch_dir, tmp_path / "q", to="torch", quantize_bits=4)
    with pytest.raises(ValueError, match="divisible by group_size 128"):
        convert_model(torch_dir, tmp_path / "q", to="mlx", quantize_bits=4, group_size=128)
    assert not (tmp_path / "q").exists()


# --- training checkpoints ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    """A real sleep_torch.train checkpoint (2 steps on a tiny Rule 110)."""
    torch.set_num_threads(1)
    from sleep_torch.train import train

    task = make("rule110", width=8, states=2, steps=0)
    tc = TRAIN_PRESETS["debug"].replace(steps=2, warmup_steps=1, batch_size=4, eval_interval=0, eval_samples=8,
                                        save_interval=0, log_interval=1)
    out = tmp_path_factory.mktemp("run")
    train(task, tr.resolve_model_config(task, "debug", {}), tc, out, progress=False)
    return out / tr.CHECKPOINT_DIR


def test_trainer_checkpoint_to_mlx(tmp_path, trainer_checkpoint):
    before = snapshot(trainer_checkpoint)
    assert detect(trainer_checkpoint) == "training"
    convert_training_checkpoint(trainer_checkpoint, tmp_path / "m", to="mlx", dtype="bfloat16")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc["tokenizer"]["type"] == "char" and doc["task"]["name"] == "rule110"
    weights = dict(sleep_torch.load(trainer_checkpoint.parent / tr.MODEL_DIR).named_parameters())
    for name, a in tree_flatten(sleep_mlx.load(tmp_path / "m").parameters()):
        assert a.dtype == mx.bfloat16
        assert torch.equal(torch.from_numpy(np.array(a.astype(mx.float32))), weights[name].to(torch.bfloat16).float())
    assert snapshot(trainer_checkpoint) == before


def test_trainer_checkpoint_stays_resumable(tmp_path, trainer_checkpoint):
    """Without a dtype cast, a trainer checkpoint converts to one of the other backend: every byte of
    weights and optimizer state kept, optimizer.json unchanged, the RNG state dropped (not portable)."""
    before = snapshot(trainer_checkpoint)
    report = convert_training_checkpoint(trainer_checkpoint, tmp_path / "m", to="mlx")
    assert report["resumable"] and report["step"] == 2 and report["converted_from"] == "torch"
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == sorted(p.name for p in trainer_checkpoint.iterdir())
    assert raw_tensors(tmp_path / "m") == raw_tensors(trainer_checkpoint)
    opt = read_raw(tmp_path / "m" / tr.OPTIMIZER_FILE)
    assert opt == (read_raw(trainer_checkpoint / tr.OPTIMIZER_FILE)[0], {"format": "lm-sleep", "backend": "mlx"})
    assert "muon.layers.0.attn.q_proj.weight.momentum" in opt[0] and "adamw.embed.weight.exp_avg_sq" in opt[0]
    assert (tmp_path / "m" / tr.OPTIMIZER_JSON).read_text() == (trainer_checkpoint / tr.OPTIMIZER_JSON).read_text()
    state = json.loads((tmp_path / "m" / tr.TRAINER_STATE_FILE).read_text())
    original = json.loads((trainer_checkpoint / tr.TRAINER_STATE_FILE).read_text())
    assert state == {**original, "backend": "mlx", "rng": {}, "converted_from": "torch"}
    assert sleep_mlx.load(tmp_path / "m").config == sleep_torch.load(trainer_checkpoint).config  # a model folder too
    # back to torch: the same bytes again; the same backend keeps its RNG state
    convert_training_checkpoint(tmp_path / "m", tmp_path / "t", to="torch")
    assert read_raw(tmp_path / "t" / tr.OPTIMIZER_FILE)[0] == opt[0]
    convert_training_checkpoint(trainer_checkpoint, tmp_path / "same", to="torch")
    assert json.loads((tmp_path / "same" / tr.TRAINER_STATE_FILE).read_text()) == original
    assert snapshot(trainer_checkpoint) == before


def test_bad_optimizer_state_is_refused(tmp_path, trainer_checkpoint):
    raw, meta = read_raw(trainer_checkpoint / tr.OPTIMIZER_FILE)
    name = "adamw.embed.weight.exp_avg"
    cases = {
        "missing": ({n: t for n, t in raw.items() if n != name}, None, f"missing optimizer tensor {name}"),
        "shape": ({**raw, name: Raw("F32", (3,), b"\0" * 12)}, None, rf"{name} has shape \[3\]"),
        "unknown": ({**raw, "adamw.embed.weight.m": raw[name]}, None, "unexpected optimizer tensor adamw.embed.weight.m"),
        "wrong optimizer": ({**raw, "muon.embed.weight.momentum": raw[name]}, None, "unexpected optimizer tensor"),
        "old layout": (raw, {"muon": {"param_groups": [], "scalars": {}}}, "optimizer.json needs"),
    }
    doc = json.loads((trainer_checkpoint / tr.OPTIMIZER_JSON).read_text())
    for case, (tensors, opt_doc, message) in cases.items():
        src = tmp_path / case
        src.mkdir()
        for f in trainer_checkpoint.iterdir():
            (src / f.name).write_bytes(f.read_bytes())
        write_raw(src / tr.OPTIMIZER_FILE, tensors, meta)
        (src / tr.OPTIMIZER_JSON).write_text(json.dumps(opt_doc or doc))
        with pytest.raises(ckpt.CheckpointError, match=message) as err:
            convert_training_checkpoint(src, tmp_path / "out", to="mlx")
        assert "\n" not in str(err.value) and not (tmp_path / "out").exists(), case


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixed_names_are_stripped(tmp_path, trainer_checkpoint, prefix):
    src = tmp_path / "ddp"
    src.mkdir()
    raw, _ = read_raw(trainer_checkpoint / "model.safetensors")
    write_raw(src / "weights.safetensors", {prefix + n: t for n, t in raw.items()}, {})
    (src / "config.json").write_text(json.dumps(ModelConfig.from_dict(
        json.loads((trainer_checkpoint / "config.json").read_text())["model"]).to_dict()))  # bare config
    assert detect(src) == "training" and strip_prefixes(prefix + "norm.weight") == "norm.weight"
    convert_training_checkpoint(src, tmp_path / "t", to="torch")
    assert raw_tensors(tmp_path / "t") == raw  # float32 in, float32 out: bit-exact
    # a single file works too (config.json beside it)
    convert_training_checkpoint(src / "weights.safetensors", tmp_path / "t1", to="mlx")
    assert raw_tensors(tmp_path / "t1") == raw


def test_one_safetensors_header_reader(tmp_path):
    f = tmp_path / "x.safetensors"
    write_raw(f, {"a": Raw("F32", (2,), b"\0" * 8), "b": Raw("BF16", (1, 3), b"\1" * 6)}, {"backend": "torch"})
    header, meta, start = ckpt.read_safetensors(f)
    assert meta == ckpt.read_metadata(f) == read_raw(f)[1] == {"backend": "torch"}
    assert ckpt.read_header(f) == {"a": ("F32", (2,)), "b": ("BF16", (1, 3))}
    assert start + max(e["data_offsets"][1] for e in header.values()) == f.stat().st_size
    text = json.dumps({"a": [1, 2]}).encode()  # an entry that is not an object
    f.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(ckpt.CheckpointError, match="corrupt safetensors header"):
        ckpt.read_metadata(f)


# --- bad inputs: one line, nothing touched -------------------------------------------------------------

def _break(folder: Path, how: str):
    f, cfg = folder / "model.safetensors", folder / "config.json"
    doc = json.loads(cfg.read_text())
    tensors = read_raw(f)[0]
    if how == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
    elif how == "header":
        f.write_bytes(struct.pack("<Q", 10 ** 9) + f.read_bytes()[8:])
    elif how == "version":
        cfg.write_text(json.dumps({**doc, "format_version": 7}))
    elif how == "config-mismatch":
        cfg.write_text(json.dumps({**doc, "model": {**doc["model"], "pattern": "SA"}}))
    elif how == "missing":
        del tensors["norm.weight"]
        write_raw(f, tensors, {})
    elif how == "extra":
        write_raw(f, {**tensors, "bonus.weight": Raw("F32", (1,), b"\0" * 4)}, {})
    elif how == "shape":
        write_raw(f, {**tensors, "norm.weight": Raw("F32", (5,), b"\0" * 20)}, {})


BAD = {"truncated": "truncated", "header": "truncated or corrupt", "version": "format_version 7",
       "config-mismatch": "missing tensor layers.0.ssm", "missing": "missing tensor norm.weight",
       "extra": "unexpected tensor bonus.weight", "shape": r"norm.weight has shape \[5\], config says \[32\]"}


@pytest.mark.parametrize("how", BAD, ids=list(BAD))
def test_bad_model_folders(tmp_path, torch_dir, how):
    _break(torch_dir, how)
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=BAD[how]) as err:
        convert_model(torch_dir, tmp_path / "out", to="mlx")
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["torch"]


def test_existing_target_is_kept_without_force(tmp_path, torch_dir):
    convert_model(torch_dir, tmp_path / "m", to="mlx")
    before = snapshot(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="already exists"):
        convert_model(torch_dir, tmp_path / "m", to="mlx", dtype="bfloat16")
    assert snapshot(tmp_path) == before
    convert_model(torch_dir, tmp_path / "m", to="mlx", dtype="bfloat16", overwrite=True)
    assert sleep_mlx.load(tmp_path / "m").embed.weight.dtype == mx.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "torch"]  # no temporary leftovers
    with pytest.raises(ValueError, match="the target is the source"):
        convert_model(torch_dir, torch_dir, to="mlx", overwrite=True)


def test_bad_training_checkpoints(tmp_path, trainer_checkpoint):
    src = tmp_path / "ckpt"
    src.mkdir()
    raw, _ = read_raw(trainer_checkpoint / "model.safetensors")
    (src / "config.json").write_text((trainer_checkpoint / "config.json").read_text())
    cases = {
        "extra": ({**raw, "module.layers.9.norm1.weight": raw["norm.weight"]}, "'module.layers.9.norm1.weight'"),
        "duplicate": ({**raw, "_orig_mod.norm.weight": raw["norm.weight"]}, "both become 'norm.weight'"),
        "shape": ({**raw, "norm.weight": Raw("F32", (3,), b"\0" * 12)}, r"'norm.weight' has shape \[3\], config says"),
        "missing": ({n: t for n, t in raw.items() if n != "layers.1.ssm.A_log"}, "missing tensor layers.1.ssm.A_log"),
    }
    for name, (tensors, message) in cases.items():
        write_raw(src / "model.safetensors", tensors, {})
        with pytest.raises(ckpt.CheckpointError, match=message) as err:
            convert_training_checkpoint(src, tmp_path / "out", to="mlx")
        assert "\n" not in str(err.value) and not (tmp_path / "out").exists(), name
    (src / "config.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no config.json"):
        convert_training_checkpoint(src, tmp_path / "out", to="mlx")


# --- command line --------------------------------------------------------------------------------------

def test_cli_convert(tmp_path, torch_dir, trainer_checkpoint):
    run = CliRunner().invoke
    ok = run(cli, ["convert", str(torch_dir), str(tmp_path / "m"), "--to", "mlx"])
    assert ok.exit_code == 0 and ok.output.startswith("converted model") and ok.output.count("\n") == 1
    q = run(cli, ["convert", str(torch_dir), str(tmp_path / "q"), "--to", "mlx", "--quantize", "8",
                  "--group-size", "32"])
    assert q.exit_code == 0 and "8-bit group 32" in q.output and "quantization error" in q.output, q.output
    t = run(cli, ["convert", str(trainer_checkpoint), str(tmp_path / "c"), "--to", "torch"])
    assert t.exit_code == 0 and t.output.startswith("converted training checkpoint"), t.output
    for args, message in [([str(torch_dir), str(tmp_path / "m"), "--to", "mlx"], "already exists"),
                          ([str(tmp_path / "q"), str(tmp_path / "t"), "--to", "torch"], "--dequantize"),
                          ([str(tmp_path / "nowhere"), str(tmp_path / "x"), "--to", "mlx"], "no such file")]:
        bad = run(cli, ["convert", *args])
        assert bad.exit_code == 2 and message in bad.output and bad.output.strip().count("\n") == 0, bad.output
    assert run(cli, ["convert", str(torch_dir), str(tmp_path / "m"), "--to", "mlx", "--force"]).exit_code == 0


def test_cli_parity(tmp_path, torch_dir):
    run = CliRunner().invoke
    ok = run(cli, ["parity", str(torch_dir), "--tokens", "20", "--gen-tokens", "5", "--json", str(tmp_path / "p.json")])
    assert ok.exit_code == 0 and "OK: max relative error" in ok.output, ok.output
    assert json.loads((tmp_path / "p.json").read_text())["ok"] is True
    fail = run(cli, ["parity", str(torch_dir), "--tokens", "20", "--gen-tokens", "0", "--tol", "0"])
    assert fail.exit_code == 1 and "FAIL" in fail.output
    missing = run(cli, ["parity", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a model folder" in missing.output
