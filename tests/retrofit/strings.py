"""A deterministic set of awkward strings for tokenizer comparisons: unicode, emoji, whitespace runs, newlines,
digits, code, and special tokens written inside the text (whole, cut, adjacent)."""

import random

PIECES = [
    "Hello", " world", "!", "?", "...", ",", "caf\u00e9", " na\u00efve", "\u00fcber", " \u6f22\u5b57",
    "\u65e5\u672c\u8a9e",
    "\u0440\u0443\u0441\u0441\u043a\u0438\u0439", " \u0627\u0644\u0639\u0631\u0628\u064a\u0629", "\U0001f600",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1fa\U0001f1f8", "\u2764\ufe0f", "e\u0301", " ", "  ",
    "    ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "0", "7", " 42", "3.14159", "1,000,000",
    "  123", "x1y2", "def f(x):", "    return x ** 2", "{\"a\": [1, 2]}", "</s>", "<s>", "'s", "'ll", " don't",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "im_end|>", "<|", "|>", "user", "assistant",
    "\\n", "#!", "---", "___", "~~", "\u2014", "\u2019", "\u00ab\u00bb", "\u00b5", "\ufb01", "\U0001d400",
]

FIXED = ["", " ", "  ", "\n", "a", "Hello, world!", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
         "<|im_end|><|im_start|>", "   leading", "trailing   ", "tabs\t\tand\nnewlines\n\n\n", "  1  22 333",
         "Numbers 12345 and 3.14159 and 1,000,000", "I'm sure they'll say it's fine, don't you think?"]


def awkward_strings(n: int = 320, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = list(FIXED)
    while len(out) < n:
        out.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))))
    return out
