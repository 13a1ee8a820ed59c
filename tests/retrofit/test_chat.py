"""Chat with retrofitted models: each turn feeds only what it adds, the template's rendering is kept,
the reply stops at the end-of-turn token, sleeps run between turns and the State stays bounded."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jinja2")
pytest.importorskip("tokenizers")

import sleep_torch  # noqa: E402
from common.chat_template import ChatTemplate  # noqa: E402
from common.conversation import Conversation  # noqa: E402
from lmsleep import workflows as wf  # noqa: E402
from lmsleep.chat import ChatSession  # noqa: E402
from sleep_torch.generate import generate  # noqa: E402
from tests.retrofit.conftest import CHATML  # noqa: E402

SMOL_STYLE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
              "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
                " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


@pytest.mark.parametrize("system", [None, "Be brief."], ids=["no-system", "system"])
@pytest.mark.parametrize("source", [CHATML, SMOL_STYLE, LLAMA3_STYLE], ids=["chatml", "smol", "llama3"])
def test_turn_texts_add_up_to_the_full_rendering(source, system):
    """Concatenating what each turn feeds and each reply gives the template's rendering of the whole
    conversation: the model reads every character exactly once, and never the past again."""
    template = ChatTemplate(source, bos_token="<s>")
    conv = Conversation(template, system=system)
    messages = [{"role": "system", "content": system}] if system else []
    fed = ""
    for k in range(5):
        user, reply = f"question {k}: what is {k} + {k}?", f"It is {2 * k}."
        fed += conv.user_turn(user)
        messages.append({"role": "user", "content": user})
        assert fed == template.render(messages, add_generation_prompt=True)
        fed += reply
        conv.assistant_done(reply)
        messages.append({"role": "assistant", "content": reply})
    assert conv.turns == 5 and len(conv.last) == 2  # bounded history, whatever the conversation's length


def test_a_template_that_rewrites_the_past_is_refused():
    rewriting = "{% for m in messages %}{{ m['role'] }}{{ loop.length }}:{{ m['content'] }};{% endfor %}"
    conv = Conversation(ChatTemplate(rewriting))
    conv.user_turn("a")
    conv.assistant_done("b")
    with pytest.raises(ValueError, match="turn by turn"):
        conv.user_turn("c")


def test_without_a_template_a_turn_is_the_line():
    assert Conversation(None).user_turn("hi") == "hi\n"
    assert Conversation(None, newline=False).user_turn("0110") == "0110"


@pytest.fixture
def tiny_chat_model(tmp_path, tiny_gguf):
    from convert.retrofit import retrofit

    _, path = tiny_gguf
    out = tmp_path / "chat"
    retrofit(path, out, window=16, passes=2, insert=1, loop="all")
    return out


def test_chat_session_feeds_each_turn_once_and_sleeps_between_turns(tiny_chat_model):
    model = sleep_torch.load(tiny_chat_model).eval()
    tok = model.tokenizer
    session = ChatSession(model, tok, generate, sampling=dict(max_tokens=6, temperature=0.0),
                          stop=wf.stop_ids(tok), no_grad=torch.no_grad, echo=lambda t, nl=True: None,
                          conversation=wf.conversation_for(tiny_chat_model, tok))
    shadow = wf.conversation_for(tiny_chat_model, tok)  # the same template, fed the same replies
    assert tok.stop_ids == (tok.token_to_id("<|im_end|>"),)
    expected_seen, L = 0, model.config.window
    for k in range(6):
        session.handle(f"hello {k}")
        expected_seen += len(tok.encode(shadow.user_turn(f"hello {k}"))) + session.reply_tokens
        shadow.assistant_done(session.conversation.last[1]["content"])
        # the State advanced by this turn's new text and the reply only, never the history again
        assert session.state.seen == expected_seen
        session.join_sleep()
        for cache in session.state.caches:  # hard eviction: at most one window of keys per block
            if hasattr(cache, "cur_k"):
                assert cache.past_k.shape[1] == 0 and cache.cur_k.shape[1] <= L
        assert session.state.hidden.shape[1] <= L
    assert session.state.sleeps >= 2  # the conversation crossed several windows of 16 tokens


def test_chat_cli_with_a_retrofitted_model(tiny_chat_model):
    from click.testing import CliRunner

    from lmsleep.cli import cli

    result = CliRunner().invoke(cli, ["chat", str(tiny_chat_model), "--backend", "torch", "--max-tokens", "5"],
                                input="hello\nhow are you?\n/stats\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "[tokens seen" in result.output and result.output.count("\n") >= 3


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_save_and_convert_keep_the_tokenizer_and_chat_template(tiny_chat_model, tmp_path, backend):
    from common.backends import require
    from convert.convert import convert_path

    pkg = require(backend).module()
    model = pkg.load(tiny_chat_model)
    assert model.chat_template and model.tokenizer.kind == "hf"
    pkg.save(model, tmp_path / "saved")
    convert_path(tiny_chat_model, tmp_path / "converted", to=backend)
    for folder in (tmp_path / "saved", tmp_path / "converted"):
        for name in ("tokenizer.json", "chat_template.jinja"):
            assert (folder / name).read_text() == (tiny_chat_model / name).read_text()
        again = pkg.load(folder)
        assert again.tokenizer.encode("hello <|im_end|>") == model.tokenizer.encode("hello <|im_end|>")


def test_chat_cli_with_a_retrofitted_model_on_mlx(tiny_chat_model):
    pytest.importorskip("mlx.core")
    from click.testing import CliRunner

    from lmsleep.cli import cli

    args = ["chat", str(tiny_chat_model), "--max-tokens", "5"]
    script = "hello\nhow are you?\nand now?\n/stats\n/quit\n"
    mlx = CliRunner().invoke(cli, args + ["--backend", "mlx"], input=script)
    torch_run = CliRunner().invoke(cli, args + ["--backend", "torch"], input=script)
    assert mlx.exit_code == 0, mlx.output
    assert mlx.output == torch_run.output  # greedy: the same replies and State numbers in both backends
    assert "sleeps" in mlx.output


def test_eval_runs_on_a_retrofitted_folder_with_its_own_tokenizer(tiny_gguf, tmp_path):
    from click.testing import CliRunner

    from convert.retrofit import retrofit
    from lmsleep.cli import cli

    out = tmp_path / "r64"
    retrofit(tiny_gguf[1], out, window=64, passes=2, insert=1)
    result = CliRunner().invoke(cli, ["eval", str(out), "--task", "recall", "--task-arg", f"tokenizer_dir={out}",
                                      "--task-arg", "window=64", "--task-arg", "k=[1,1]", "--task-arg",
                                      "facts=[1,1]", "--n", "4", "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert "acc_k1" in result.output and "chance" in result.output
