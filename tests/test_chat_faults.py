"""A chat never loses its conversation to a bad command, and works with every tokenizer kind."""

import os

import pytest
from click.testing import CliRunner

from common.config import ModelConfig
from common.tokenizers import ByteTokenizer, CharTokenizer
from lmsleep.cli import cli

torch = pytest.importorskip("torch")
from sleep_torch import HybridLM, save  # noqa: E402
from tests.retrofit.conftest import tiny_bpe, tiny_gguf  # noqa: E402, F401  (fixtures: a tiny retrofittable GGUF)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A byte-level model, another one (other weights) and a character-level one without a newline."""
    root = tmp_path_factory.mktemp("chat")
    byte_cfg = ModelConfig.from_name("debug", vocab_size=ByteTokenizer().vocab_size, window=16, sleep_passes=2)
    save(HybridLM(byte_cfg, seed=0), root / "byte", tokenizer=ByteTokenizer().to_dict())
    other = HybridLM(byte_cfg, seed=1)
    _, state = other.step(torch.tensor([[1, 2, 3]]), other.new_state(1))
    other.save_state(state, root / "other.safetensors")
    chars = CharTokenizer(["0", "1", "|"])
    char_cfg = ModelConfig.from_name("debug", vocab_size=chars.vocab_size, window=8, sleep_passes=2)
    save(HybridLM(char_cfg, seed=0), root / "char", tokenizer=chars.to_dict())
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (root / "a_file").write_text("x")
    (root / "a_dir").mkdir()
    return root


def session_for(folder):
    from lmsleep import workflows as wf
    from lmsleep.chat import ChatSession

    b, model, tok = wf.load_for_generation("torch", folder)
    lines = []
    session = ChatSession(model, tok, b.generate, sampling=dict(max_tokens=6), stop=wf.stop_ids(tok),
                          no_grad=b.no_grad, echo=lambda text, nl=True: lines.append(text),
                          conversation=wf.conversation_for(folder, tok))
    return session, lines


def test_failed_save_and_load_change_nothing(models):
    failing = [f"/save {models / 'a_dir'}", f"/save {models / 'a_file' / 'mem.safetensors'}",
               f"/load {models / 'corrupt.safetensors'}", f"/load {models / 'other.safetensors'}",
               f"/load {models / 'missing.safetensors'}", f"/load {models / 'a_dir'}", "/save", "/load"]
    if os.geteuid() != 0:  # root may write anywhere
        locked = models / "locked"
        locked.mkdir(mode=0o500, exist_ok=True)
        failing.append(f"/save {locked / 'mem.safetensors'}")
    plain, _ = session_for(models / "byte")
    plain.handle("hello there, sleepy model")
    faulty, lines = session_for(models / "byte")
    faulty.handle("hello there, sleepy model")
    before = len(lines)
    for command in failing:
        assert faulty.handle(command) is True  # the session goes on
    errors = lines[before:]
    assert len(errors) == len(failing) and all(e.startswith("error: ") and "\n" not in e for e in errors), errors
    assert faulty.reply("and now?") == plain.reply("and now?")  # the State is the one without the failures
    assert (faulty.state.seen, faulty.state.sleeps) == (plain.state.seen, plain.state.sleeps)


def test_bad_memory_flag_is_one_line_and_the_chat_goes_on(models):
    for memory in ("corrupt.safetensors", "other.safetensors", "missing.safetensors", "a_dir"):
        result = CliRunner().invoke(cli, ["chat", str(models / "byte"), "--memory", str(models / memory),
                                          "--max-tokens", "3", "--backend", "torch"], input="hi\n/stats\n")
        assert result.exit_code == 0, result.output
        assert result.output.count("error: ") == 1 and "Traceback" not in result.output
        assert "[tokens seen " in result.output  # it answered and counted from an empty memory


def test_character_model_chats_without_a_newline(models):
    session, lines = session_for(models / "char")
    assert session.conversation.newline is False  # '\n' is not in the vocabulary {0, 1, |}
    reply = session.reply("0110")
    assert set(reply) <= {"0", "1", "|"} and session.state.seen == 4 + len(reply)
    session.handle("01x")  # an unknown character: one error line, nothing fed
    assert lines[-1].startswith("error: unknown character 'x'") and session.state.seen == 4 + len(reply)


def test_byte_model_takes_stdin_bytes_that_are_not_utf8(models):
    raw = b"caf\xe9 \xff\xfe ok"  # Latin-1 and stray bytes: not UTF-8
    args = ["chat", str(models / "byte"), "--max-tokens", "2", "--backend", "torch"]
    result = CliRunner().invoke(cli, args, input=raw + b"\n/stats\n")
    assert result.exit_code == 0 and "error" not in result.output, result.output
    seen = int(result.output.split("[tokens seen ")[1].split(",")[0])
    assert seen == len(raw) + 1 + 2  # the bytes as they came, the newline, the 2 reply tokens
    session, _ = session_for(models / "byte")
    from lmsleep.workflows import encode_text

    assert encode_text(session.tokenizer, raw.decode("utf-8", "surrogateescape")) == list(raw)


def test_retrofitted_hf_model_takes_bytes_that_are_not_utf8_as_replacement_characters(tmp_path, tiny_gguf):
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from convert.retrofit import retrofit

    out = tmp_path / "chat"
    retrofit(tiny_gguf[1], out, window=16, passes=2, insert=1, loop="all")
    args = ["chat", str(out), "--max-tokens", "3", "--backend", "torch"]
    result = CliRunner().invoke(cli, args, input=b"caf\xe9?\n/stats\n")
    assert result.exit_code == 0 and "error" not in result.output, result.output
    assert "[tokens seen " in result.output
