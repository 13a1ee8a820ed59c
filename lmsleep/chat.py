"""`lmsleep chat`: a REPL over one streaming State, so memory stays constant however long it runs.

A sleep that falls due during a reply runs between turns, on a background thread started right
after the reply (while the user is typing), and is joined before the next input is processed
(SPEC section 3: `model.sleep(state)` gives the same numbers as the lazy sleep in `step`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from common.conversation import Conversation
from lmsleep.workflows import encode_text, one_line

HELP = ("commands: /reset (forget everything), /sleep (consolidate the current window now), "
        "/save FILE, /load FILE (memory files), /stats, /help, /quit")


class ChatSession:
    """One conversation: user turns are fed through `step`, replies come from `generate`."""

    def __init__(self, model, tokenizer, generate: Callable, *, sampling: dict, stop: list[int],
                 no_grad=contextlib.nullcontext, echo: Callable[..., None] | None = None,
                 conversation: Conversation | None = None):
        self.model, self.tokenizer, self.generate = model, tokenizer, generate
        self.sampling, self.stop, self.no_grad = sampling, stop, no_grad
        self.conversation = conversation or Conversation()  # what each turn feeds (chat template or a line)
        self.echo = echo or (lambda text, nl=True: print(text, end="\n" if nl else "", flush=True))
        self.state = model.new_state(1)
        self.sleeper: threading.Thread | None = None  # the between-turns sleep, if one is running
        self.reply_tokens = 0  # tokens of the last reply

    # --- background sleep --------------------------------------------------------------------------
    def start_sleep_if_due(self) -> None:
        if self.state.due and self.sleeper is None:
            self.sleeper = threading.Thread(target=self._sleep, name="lmsleep-sleep", daemon=True)
            self.sleeper.start()

    def _sleep(self) -> None:
        with self.no_grad():
            self.model.sleep(self.state)

    def join_sleep(self) -> None:
        if self.sleeper is not None:
            self.sleeper.join()
            self.sleeper = None

    # --- one input line ----------------------------------------------------------------------------
    def handle(self, line: str) -> bool:
        """Process one line; False means the session should end."""
        self.join_sleep()  # the state must be settled before anything reads or changes it
        command, _, arg = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return False
        if command in ("/reset", "/sleep", "/stats", "/help", "/save", "/load"):
            self.command(command, arg.strip())
            return True
        if command.startswith("/"):
            self.write(f"unknown command {command}; {HELP}")
            return True
        self.reply(line)
        return True

    def command(self, name: str, arg: str) -> None:
        """Run one /command; a failure (bad file, wrong model, unwritable path) is one line and changes
        nothing: the State and the conversation stay as they were."""
        actions = {"/reset": self._reset, "/sleep": self._force_sleep, "/stats": self._stats,
                   "/help": lambda _: self.write(HELP), "/save": self._save, "/load": self._load}
        try:
            actions[name](arg)
        except (ValueError, OSError) as e:
            self.write(f"error: {one_line(e)}")

    def reply(self, text: str) -> str:
        """Feed the user's turn (only what it adds), stream the reply as it is generated."""
        try:
            ids = encode_text(self.tokenizer, self.conversation.user_turn(text))
        except ValueError as e:  # a character the vocabulary lacks, a template that refuses the turn
            self.write(f"error: {one_line(e)}")
            return ""
        tokens, shown = [], ""
        with self.no_grad():
            for token in self.generate(self.model, ids, state=self.state, stop=self.stop, **self.sampling):
                if token in self.stop:
                    break
                tokens.append(token)
                text_so_far = self.tokenizer.decode(tokens)
                if not text_so_far.endswith("\ufffd"):  # hold back a multi-byte character cut in two
                    self.echo(text_so_far[len(shown):], nl=False)
                    shown = text_so_far
        reply = self.tokenizer.decode(tokens)
        self.reply_tokens = len(tokens)  # generated and fed back (the stop token is fed with the next turn)
        self.echo(reply[len(shown):])
        self.conversation.assistant_done(reply)
        self.start_sleep_if_due()
        return reply

    def write(self, line: str) -> None:
        self.echo(line)

    # --- commands ----------------------------------------------------------------------------------
    def _reset(self, _):
        self.state = self.model.new_state(1)
        self.conversation.reset()
        self.write("[memory cleared]")

    def _force_sleep(self, _):
        before = self.state.sleeps
        with self.no_grad():
            self.model.sleep(self.state, force=True)
        self.write(f"[slept: {self.state.sleeps - before} consolidation(s)]")

    def _stats(self, _):
        s = self.state
        self.write(f"[tokens seen {s.seen}, sleeps {s.sleeps}, window {s.offset}/{self.model.config.window}, "
                   f"memory {s.nbytes() / 1024:.1f} KiB]")

    def _save(self, path):
        if not path:
            raise ValueError("/save needs a file name")
        if os.path.isdir(path):  # checked first: the write would fail only after serializing the State
            raise IsADirectoryError(errno.EISDIR, "is a directory; /save needs a file name", path)
        self.model.save_state(self.state, path)
        self.write(f"[memory saved to {path}]")

    def _load(self, path):
        if not path:
            raise ValueError("/load needs a file name")
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such memory file" if not Path(path).exists() else
                             f"{path}: not a memory file (a directory or a special file)")
        self.state = self.model.load_state(path)  # assigned only once the whole file has loaded
        self.write(f"[memory loaded: {self.state.seen} tokens, {self.state.sleeps} sleeps]")


def run_repl(session: ChatSession, *, interactive: bool) -> None:
    """Read lines until EOF or /quit; with a terminal, use readline history and a prompt."""
    prompt = ""
    if interactive:
        with contextlib.suppress(ImportError, OSError):
            import readline

            history = os.path.expanduser("~/.lmsleep_history")
            with contextlib.suppress(FileNotFoundError):
                readline.read_history_file(history)
            import atexit

            atexit.register(readline.write_history_file, history)
        prompt = "> "
        session.write(HELP)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach a byte-level model as bytes
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            break
        if not session.handle(line):
            break
    session.join_sleep()
