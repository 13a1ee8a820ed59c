"""Chat templates: a model's Jinja template rendered as transformers' `apply_chat_template(..., tokenize=False)`.

    template = ChatTemplate(source.chat_template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    prompt = template.render(messages, add_generation_prompt=True)
    more = template.render_new(messages, n_done=4)   # only what messages[4:] add to the first 4, rendered

The environment is the one transformers builds: jinja2's ImmutableSandboxedEnvironment (templates come from the Hub
and are untrusted code) with trim_blocks and lstrip_blocks, the loop-controls extension, a `tojson` filter that does
not HTML-escape, and the globals `raise_exception(message)` and `strftime_now(format)`. Special tokens are template
variables (bos_token, eos_token, ...), and None-valued message keys are dropped, as transformers does.

`jinja2` is imported when a template is built, never by `import common`.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Mapping, Sequence


class ChatTemplateError(ValueError):
    """A template refused the conversation (raise_exception) or cannot render it incrementally."""


def _environment():
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("chat templates need jinja2: pip install 'lm-sleep[hf]'") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _messages(messages: Sequence[Mapping]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i} is {type(m).__name__}, not a dict with 'role' and 'content'")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


class ChatTemplate:
    """One compiled chat template plus the special tokens it may read."""

    def __init__(self, source: str, **special_tokens: str | None):
        if not isinstance(source, str) or not source:
            raise ValueError("chat template must be a non-empty string")
        import jinja2

        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat template line {e.lineno}: {e.message}") from None
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: Sequence[Mapping], *, add_generation_prompt: bool = False, tools=None,
               documents=None, **kwargs) -> str:
        """The prompt text, as apply_chat_template(messages, tokenize=False, ...); kwargs are template variables
        (enable_thinking=False, ...) and override the special tokens."""
        import jinja2

        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=_messages(messages), tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None

    def render_new(self, messages: Sequence[Mapping], n_done: int, *, add_generation_prompt: bool = True,
                   done_add_generation_prompt: bool = False, **kwargs) -> str:
        """The text that messages[n_done:] append to a conversation already rendered up to message n_done:
        render(messages[:n_done], add_generation_prompt=done_add_generation_prompt) + result == render(messages, ...).

        Not every template allows it: one that rewrites earlier turns once more follow (Qwen3 drops the reasoning of
        assistant turns before the last user message; others treat the last message specially) renders a prefix
        that is not a prefix of the longer conversation. That is detected by comparing the two renderings and
        raised as ChatTemplateError naming the first differing character, so a caller can re-encode from scratch.
        """
        if not 0 <= n_done <= len(messages):
            raise ValueError(f"n_done={n_done} is outside [0, {len(messages)}]")
        full = self.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        done = self.render(messages[:n_done], add_generation_prompt=done_add_generation_prompt, **kwargs)
        if not full.startswith(done):
            at = next((i for i, (a, b) in enumerate(zip(done, full)) if a != b), min(len(done), len(full)))
            raise ChatTemplateError(
                f"this chat template renders messages[:{n_done}] differently once later messages follow "
                f"(first difference at character {at}: {done[at:at + 20]!r} vs {full[at:at + 20]!r}); "
                "the conversation must be rendered again from the start")
        return full[len(done):]

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars, specials={sorted(self.special_tokens)})"


__all__ = ["ChatTemplate", "ChatTemplateError"]
