"""Conversations as States (lmsleep.sessions), without HTTP: a request continues from the longest snapshot
its text starts with, so turn k processes only what turn k adds; snapshots survive a restart; limits hold."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jinja2")
pytest.importorskip("tokenizers")

from lmsleep.sessions import Busy, ParamError, Sampling, open_engine, text_key  # noqa: E402
from sleep_torch.generate import generate  # noqa: E402
from tests.retrofit.conftest import tiny_bpe  # noqa: E402,F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
_BUILT = {}


def build_chat_model(tmp_path_factory, bpe):
    """A retrofitted tiny llama with a ChatML template (window 16, N=2), built once per test process."""
    if "dir" not in _BUILT:
        pytest.importorskip("transformers")
        pytest.importorskip("gguf")
        from convert.retrofit import retrofit
        from tests.retrofit.conftest import hf_model, write_tiny_gguf

        _, tokens, merges = bpe
        base = tmp_path_factory.mktemp("served")
        gguf = write_tiny_gguf(base / "tiny.gguf", hf_model("llama", seed=1, vocab_size=len(tokens)), tokens, merges)
        retrofit(gguf, base / "chat", window=16, passes=2, insert=1, loop="all")
        _BUILT["dir"] = base / "chat"
    return _BUILT["dir"]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_bpe):  # noqa: F811
    return build_chat_model(tmp_path_factory, tiny_bpe)


@pytest.fixture
def engine_at(chat_model, tmp_path):
    """engine_at(sessions_dir, **options) -> an Engine over the tiny chat model; all closed at the end."""
    made = []

    def make(sessions="sessions", **options):
        e = open_engine(chat_model, backend="torch", sessions_dir=None if sessions is None else tmp_path / sessions,
                        **options)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def reference_reply(engine, text, sampling: Sampling) -> str:
    """What the library's generate gives for `text` from a fresh State."""
    ids = engine.tokenizer.encode(text)
    out = []
    for t in generate(engine.model, ids, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                      top_p=sampling.top_p, seed=sampling.seed, stop=engine.stop_ids):
        if t in engine.stop_ids:
            break
        out.append(t)
    return engine.tokenizer.decode(out)


def user(text):
    return {"role": "user", "content": text}


def test_a_first_reply_equals_generate_streamed_or_not(engine_at):
    engine = engine_at()
    messages = [{"role": "system", "content": "Be brief."}, user("hello there")]
    sampling = Sampling(max_tokens=12, temperature=0.9, seed=5)
    expected = reference_reply(engine, engine.conversation.template.render(messages, add_generation_prompt=True),
                               sampling)
    with engine.chat(messages, sampling) as turn:
        pieces = list(turn)
    assert "".join(pieces) == turn.text == expected
    assert turn.usage["prompt_tokens_details"]["cached_tokens"] == 0
    again = engine.chat(messages, sampling).read()  # an identical request: same seed, same reply
    assert again == expected


def test_twenty_turns_process_only_each_new_turn_and_a_restart_continues_exactly(engine_at):
    engine = engine_at(max_sessions=2)
    template, tok = engine.conversation.template, engine.tokenizer
    messages, consumed, seen, sleeps = [], "", 0, 0
    for k in range(20):
        messages.append(user(f"question {k}?"))
        with engine.chat(messages, Sampling(max_tokens=6, temperature=0.9, seed=k)) as turn:
            reply = turn.read()
        rendering = template.render(messages, add_generation_prompt=True)
        assert rendering.startswith(consumed)
        assert turn.cached_tokens == seen  # the whole history came from the snapshot ...
        assert turn.prompt_ids == tok.encode(rendering[len(consumed):])  # ... only the turn's new text was fed
        seen += turn.processed
        consumed = rendering + reply
        messages.append({"role": "assistant", "content": reply})
        snapshot = engine.store.entries[text_key("chat:passes=None", consumed)]
        sleeps += snapshot.sleeper is not None  # a window filled: it slept in the background
    assert engine.counters["snapshot_hits"] == 19 and sleeps >= 1
    assert engine.stats()["in_ram"] <= 2  # RAM holds max_sessions States, the disk the rest

    messages.append(user("and the 21st?"))
    sampling = Sampling(max_tokens=8, temperature=0.9, seed=21)
    restarted = engine_at()  # a new process would see the same directory
    assert restarted.store.stats()["snapshots"] == 20
    with restarted.chat(messages, sampling) as after_restart:
        after_restart.read()
    with engine.chat(messages, sampling) as without:
        without.read()
    assert after_restart.text == without.text
    assert after_restart.cached_tokens == without.cached_tokens == seen  # no recomputation after the restart


def test_an_edited_reply_falls_back_to_the_previous_snapshot(engine_at):
    engine = engine_at()
    messages = [user("one")]
    first = engine.chat(messages, Sampling(max_tokens=5, temperature=0.0))
    first.read()
    messages += [{"role": "assistant", "content": first.text}, user("two")]
    second = engine.chat(messages, Sampling(max_tokens=5, temperature=0.0))
    second.read()
    end_of_first = first.cached_tokens + first.processed
    assert second.cached_tokens == end_of_first
    messages += [{"role": "assistant", "content": "an edited reply"}, user("three")]
    third = engine.chat(messages, Sampling(max_tokens=5, temperature=0.0))
    third.read()
    assert third.cached_tokens == end_of_first  # turn two's snapshot does not match: recomputed from turn one


def test_completions_continue_a_prompt_and_its_completion(engine_at):
    engine = engine_at()
    first = engine.complete("The quick brown fox", Sampling(max_tokens=6, temperature=0.0))
    first.read()
    assert first.text == reference_reply(engine, "The quick brown fox", Sampling(max_tokens=6, temperature=0.0))
    second = engine.complete("The quick brown fox" + first.text + " jumps", Sampling(max_tokens=4, temperature=0.0))
    second.read()
    assert second.cached_tokens == first.processed and second.prompt_ids == engine.tokenizer.encode(" jumps")
    chat = engine.chat([user("The quick brown fox")], Sampling(max_tokens=2))
    chat.read()
    assert chat.cached_tokens == 0  # chats and completions never share snapshots


def test_a_stop_string_ends_the_reply_before_it(engine_at):
    engine = engine_at()
    full = engine.complete("Hello world", Sampling(max_tokens=12, temperature=0.0)).read()
    stop = full[3:5]
    with engine.complete("Hello world", Sampling(max_tokens=12, temperature=0.0, stop=[stop, "never"])) as turn:
        pieces = list(turn)
    assert turn.text == full[:full.index(stop)] == "".join(pieces) and turn.finish_reason == "stop"


def test_requests_beyond_running_and_queued_are_busy(engine_at):
    engine = engine_at(sessions=None, parallel=1, queue=0)
    held = engine.chat([user("a")], Sampling(max_tokens=2))
    with pytest.raises(Busy):
        engine.chat([user("b")], Sampling(max_tokens=2))
    held.close()  # never iterated: released all the same
    engine.chat([user("b")], Sampling(max_tokens=2)).read()
    assert engine.counters["busy"] == 1 and engine.stats()["running_or_waiting"] == 0


def test_the_disk_cap_drops_least_recently_used_snapshots(engine_at, tmp_path):
    engine = engine_at(max_disk_bytes=60_000)
    for k in range(6):
        engine.chat([user(f"conversation {k}")], Sampling(max_tokens=3)).read()
    engine.close()
    files = list((tmp_path / "sessions").glob("*/*.safetensors"))
    assert 1 <= len(files) == engine.stats()["snapshots"] < 6
    assert sum(f.stat().st_size for f in files) <= 60_000


def test_an_unreadable_snapshot_is_recomputed(engine_at, tmp_path):
    engine = engine_at(max_sessions=1)
    first = engine.chat([user("one")], Sampling(max_tokens=4))
    first.read()
    engine.chat([user("other")], Sampling(max_tokens=4)).read()  # pushes the first State out of RAM
    engine.close()
    for f in (tmp_path / "sessions").glob("*/*.safetensors"):
        f.write_bytes(b"not a memory file")
    again = engine.chat([user("one"), {"role": "assistant", "content": first.text}, user("two")], Sampling(max_tokens=3))
    again.read()
    assert again.cached_tokens == 0 and again.finish_reason in ("stop", "length")


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=2.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"), (dict(seed=-1), "seed"), (dict(stop=["a", ""]), "stop"),
    (dict(stop=["a"] * 5), "stop"), (dict(top_k=-1), "top_k"), (dict(temperature="hot"), "temperature"),
], ids=["temperature", "top_p", "max_tokens", "bool", "seed", "empty-stop", "five-stops", "top_k", "string"])
def test_bad_sampling_names_the_parameter(kwargs, param):
    with pytest.raises(ParamError) as e:
        Sampling(**kwargs)
    assert e.value.param == param and param in str(e.value)


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "x"}], [{"role": "user"}], ["hi"],
                                      [{"role": "user", "content": [{"type": "image_url"}]}]],
                         ids=["empty", "role", "no-content", "not-object", "image"])
def test_bad_messages_are_refused(engine_at, messages):
    engine = engine_at(sessions=None)
    with pytest.raises(ParamError, match="messages"):
        engine.chat(messages, Sampling())
    assert engine.stats()["running_or_waiting"] == 0


def test_a_model_without_a_chat_template_gets_each_message_as_a_line(tmp_path):
    from common.config import ModelConfig
    from common.tokenizers import ByteTokenizer
    from sleep_torch import HybridLM, save

    cfg = ModelConfig.from_name("debug", vocab_size=ByteTokenizer().vocab_size, window=16, sleep_passes=2)
    save(HybridLM(cfg, seed=0), tmp_path / "bytes", tokenizer=ByteTokenizer().to_dict())
    engine = open_engine(tmp_path / "bytes", backend="torch", sessions_dir=tmp_path / "sessions")
    sampling = Sampling(max_tokens=8, temperature=0.5, seed=1)
    first = engine.chat([{"role": "system", "content": "sys"}, user("hello")], sampling)
    assert first.read() == reference_reply(engine, "sys\nhello\n", sampling)
    second = engine.chat([{"role": "system", "content": "sys"}, user("hello"),
                          {"role": "assistant", "content": first.text}, user("again")], sampling)
    second.read()
    assert second.cached_tokens == first.processed and second.prompt_ids == list(b"again\n")
    engine.close()


def test_replies_are_decoded_incrementally_as_a_whole(engine_at):
    """The text built token by token (decoding only the last few) equals decoding all ids at once, for
    random ids: cut multi-byte characters, special tokens, invalid bytes."""
    import numpy as np

    from common.tokenizers import ByteTokenizer
    from lmsleep.sessions import _Detokenizer

    hf = engine_at(sessions=None).tokenizer
    rng = np.random.default_rng(0)
    for tok in (hf, ByteTokenizer()):
        for _ in range(40):
            ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 30))).tolist()
            d = _Detokenizer(tok)
            for i in ids:
                d.add(i)
                assert not d.text.endswith("\ufffd") and tok.decode(ids).startswith(d.text)
            d.flush()
            assert d.text == tok.decode(ids)


def test_an_unwritable_sessions_directory_keeps_serving_from_ram(engine_at, tmp_path):
    engine = engine_at()
    target = engine.store.dir
    target.rename(target.with_name("gone"))  # the directory disappears under the server
    target.parent.joinpath(target.name).write_text("a file where the directory was")
    first = engine.chat([user("one")], Sampling(max_tokens=4))
    first.read()
    second = engine.chat([user("one"), {"role": "assistant", "content": first.text}, user("two")], Sampling(max_tokens=3))
    second.read()
    assert second.cached_tokens == first.processed  # continued from the snapshot kept in RAM
