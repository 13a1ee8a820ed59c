"""What a chat feeds its model, one turn at a time, never the past again (framework-free).

A sleeping model keeps the whole conversation in its State, so each turn must hand it only the
text that turn adds. With a chat template (common.chat_template) that text is the difference
between the template's rendering of the conversation with the new user message (and the
generation prompt) and what the model has already consumed (the previous renderings plus the
tokens it generated). The renderer keeps a bounded history: the system message and the last
exchange are enough for the chat templates of Llama-family models, where each message renders on
its own; a template for which that is not true is detected (the rendering would not extend what
was consumed) and reported as ChatTemplateError.

Without a template (the task tokenizers of models trained from scratch) a turn is the user's line
plus a newline where the vocabulary has one.
"""

from __future__ import annotations

from typing import Mapping

from common.chat_template import ChatTemplate, ChatTemplateError


class Conversation:
    """Turn texts for one chat: `user_turn(text)` -> the text to feed; `assistant_done(reply)` after."""

    def __init__(self, template: ChatTemplate | None = None, *, system: str | None = None,
                 newline: bool = True, special_tokens: Mapping[str, str] | None = None):
        self.template, self.newline = template, newline
        self.special = dict(special_tokens or {})
        self.head = [{"role": "system", "content": system}] if system else []
        self.last: list[dict] = []  # the previous exchange: [user, assistant]
        self.consumed = ""  # what the model has read of the bounded rendering (head + last)
        self.turns = 0

    def user_turn(self, text: str) -> str:
        """The text the model must read for a new user message (ending with the generation prompt)."""
        if self.template is None:
            return text + ("\n" if self.newline else "")
        messages = self.head + self.last + [{"role": "user", "content": text}]
        full = self.template.render(messages, add_generation_prompt=True, **self.special)
        if not full.startswith(self.consumed):
            at = next((i for i, (a, b) in enumerate(zip(self.consumed, full)) if a != b), len(self.consumed))
            raise ChatTemplateError(f"this chat template does not render a conversation turn by turn (it rewrites "
                                    f"earlier text at character {at}); the chat cannot continue from its State")
        self._pending = (text, full)
        return full[len(self.consumed):]

    def assistant_done(self, reply: str) -> None:
        """Record the reply the model generated after the last user_turn (its text, stop token excluded)."""
        self.turns += 1
        if self.template is None:
            return
        user, _ = self._pending
        self.last = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        # What head + last render to up to the reply's end (the bounded history's view of the past).
        prompt = self.template.render(self.head + self.last[:1], add_generation_prompt=True, **self.special)
        self.consumed = prompt + reply

    def reset(self) -> None:
        self.last, self.consumed, self.turns = [], "", 0


__all__ = ["Conversation", "ChatTemplateError"]
