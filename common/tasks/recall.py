"""Recall of evicted facts in natural text, in the model's own tokenizer.

Sequence (defaults: window 128, k in 1..3, T = (k_hi + 1) * window = 512 tokens):
    w0 | The lamp flickered once. Alice lives in Paris. A dog barked far away. ...
    w1 | The code of locker 17 is 4821. The kettle began to whistle. ...
    w2 | It rained. The clock ticked on the wall. ...
    w3 | The sky was grey. ... Question: Where does Alice live? Answer: Paris.      final window
- Facts (one sentence each): "<name> lives in <city>.", "The code of locker <m> is <code>.",
  "<name> works as a <job>."; names (and locker numbers) are distinct within an example.
- Each fact i gets its own distance k_i ~ U[k_lo, k_hi] and sits entirely inside window Q - k_i, where
  Q = k_hi is the final window: under hard eviction the question comes exactly k_i windows after the fact.
- The final window holds `queries` questions about distinct facts, right after filler, ending the sequence:
  " Question: Where does Alice live? Answer: Paris." The loss is on the answer tokens (" Paris") only.
- Two hops (hops=2 or [1, 2]): the queried fact is "<name1> lives in <city>." at distance k and a link
  "<name2> lives where <name1> lives." at distance U[1, k]; the question asks where name2 lives.
- Every window is exactly `window` tokens: the facts at random offsets, the gaps filled with filler
  sentences that never cross a window boundary, and with the spacer token (" ") where no sentence fits.
  There is no padding: T = (k_hi + 1) * window for every example.

Texts are concatenations of separately encoded pieces, each starting at a word boundary (" Alice",
" lives in", " Paris", "."), so token counts are exact and additive. With byte-level BPE tokenizers
(GPT-2 style: SmolLM2, Llama 3, Qwen) this is what encoding the joined text gives, spacers aside.

The helpers at the top (tokenizer loading, piece encoding, size bounds) are shared with gsm_infinite.py.
"""

from __future__ import annotations

import json
import random
from bisect import bisect_right
from pathlib import Path

import numpy as np

from common.tasks.base import (Batch, Task, check_int, check_range, check_sample_args, grouped_accuracy, json_range,
                               predictions)
from common.tokenizers import ByteTokenizer, tokenizer_from_dict

MAX_SEQ_LEN = 65_536  # T bound for the natural-text tasks
MAX_BATCH_TOKENS = 1 << 26  # n * T bound (256 MiB of int32 tokens)


# ---------------------------------------------------------------- shared natural-text helpers

def load_tokenizer(task: str, tokenizer, tokenizer_dir):
    """The task's tokenizer: an object with encode/decode/vocab_size, a model folder (config.json with a
    "tokenizer" block, or a Hugging Face folder with tokenizer.json), or the byte tokenizer when neither."""
    if tokenizer is not None and tokenizer_dir is not None:
        raise ValueError(f"{task}: give tokenizer or tokenizer_dir, not both")
    if tokenizer is not None:
        missing = [a for a in ("encode", "decode", "vocab_size") if not hasattr(tokenizer, a)]
        if missing:
            raise ValueError(f"{task}: tokenizer {type(tokenizer).__name__} lacks {', '.join(missing)}")
        return tokenizer
    if tokenizer_dir is None:
        return ByteTokenizer()
    if not isinstance(tokenizer_dir, (str, Path)):
        raise ValueError(f"{task}: tokenizer_dir must be a folder path, got {tokenizer_dir!r}")
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise ValueError(f"{task}: tokenizer_dir {str(folder)!r} is not a folder")
    config = folder / "config.json"
    doc = {}
    if config.is_file():
        try:
            doc = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{task}: {config} is not JSON ({e})") from None
    if isinstance(doc, dict) and isinstance(doc.get("tokenizer"), dict):
        return tokenizer_from_dict(doc["tokenizer"], folder)
    if (folder / "tokenizer.json").is_file():
        from common.hf_tokenizer import HFTokenizer

        names = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
        files = {n: (folder / n).read_text(encoding="utf-8") for n in names if (folder / n).is_file()}
        return HFTokenizer.from_files(files)
    raise ValueError(f"{task}: {folder} has neither a config.json tokenizer block nor a tokenizer.json")


class Pieces:
    """Encodes text pieces (each starting at a word boundary) with a cache; builds token sequences from them."""

    def __init__(self, task: str, tokenizer):
        self.task, self.tokenizer, self.cache = task, tokenizer, {}
        self.spacer = self._single(" ", ".", "\n")
        ids = [getattr(tokenizer, a, None) for a in ("pad_id", "eos_id", "eot_id")]
        self.pad = next((int(i) for i in ids if i is not None), self.spacer)

    def _single(self, *candidates) -> int:
        for text in candidates:
            ids = self.tokenizer.encode(text)
            if len(ids) == 1:
                return int(ids[0])
        raise ValueError(f"{self.task}: the tokenizer has no single token for any of {candidates!r} (the spacer)")

    def __call__(self, piece: str) -> list[int]:
        ids = self.cache.get(piece)
        if ids is None:
            if len(self.cache) > 200_000:
                self.cache.clear()
            ids = self.cache[piece] = [int(i) for i in self.tokenizer.encode(piece)]
        return ids

    def join(self, pieces) -> list[int]:
        return [i for p in pieces for i in self(p)]

    def longest(self, pieces) -> int:
        return max(len(self(p)) for p in pieces)


def check_batch_tokens(task: str, n: int, T: int):
    if n * T > MAX_BATCH_TOKENS:
        raise ValueError(f"{task}: n * T = {n} * {T} tokens is over the bound {MAX_BATCH_TOKENS}; "
                         "sample smaller batches")



def build_batch(task: str, n: int, seed: int, seq_len: int, example, key: str) -> Batch:
    """n examples of seq_len tokens: example(rng) -> (ids, info), rng = Random(f"{key}/{seed}/{i}"), so example i
    depends on (seed, i) only and sample(n + 1) extends sample(n). info's lists become meta arrays (ints
    as int32); the loss mask covers each example's answer spans (answer_start/answer_len: ints or lists)."""
    n, seed = check_sample_args(task, n, seed)
    check_batch_tokens(task, n, seq_len)
    tokens = np.zeros((n, seq_len), np.int32)
    rows = []
    for i in range(n):
        ids, info = example(random.Random(f"{key}/{seed}/{i}"))
        tokens[i] = ids
        rows.append(info)
    meta = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    for k in meta:
        if meta[k].dtype.kind == "i":
            meta[k] = meta[k].astype(np.int32)
    loss_mask = np.zeros_like(tokens, dtype=bool)
    for i in range(n):
        for s, length in zip(np.atleast_1d(meta["answer_start"][i]), np.atleast_1d(meta["answer_len"][i])):
            loss_mask[i, s: s + length] = True
    return Batch(tokens, loss_mask, meta)


def text_score(hits: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """acc plus grouped accuracies {prefix: group values}, all over the same flat list of answers."""
    out = {"acc": float(hits.mean())}
    for prefix, values in groups.items():
        out.update(grouped_accuracy(hits, values, prefix))
    return out


def span_hits(task: str, logits_or_predictions, batch: Batch, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """bool, shape of start: whether every token of each answer span [start, start + length) is predicted right
    (teacher-forced exact match: pred[:, t - 1] is the guess for tokens[:, t])."""
    pred = predictions(task, logits_or_predictions, batch)
    right = np.zeros_like(batch.tokens, dtype=bool)
    right[:, 1:] = pred[:, :-1] == batch.tokens[:, 1:]
    n = len(batch)
    start, length = start.reshape(n, -1), length.reshape(n, -1)
    out = np.zeros(start.shape, bool)
    for i in range(n):
        for j in range(start.shape[1]):
            out[i, j] = right[i, start[i, j]: start[i, j] + length[i, j]].all()
    return out


# ---------------------------------------------------------------- recall

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo",
         "Maria", "Nathan", "Olivia", "Peter", "Quinn", "Rachel", "Samuel", "Tina", "Victor", "Wendy", "Xavier",
         "Yusuf", "Zoe", "Amir", "Bianca", "Carlos", "Daria", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas",
         "Kenji", "Lena", "Marco", "Nadia", "Oscar", "Priya", "Rosa", "Stefan", "Tomas", "Ursula", "Vera",
         "Walter", "Yara", "Arjun", "Chloe", "Diego", "Fatima", "Ivan", "Julia", "Lucas", "Mei", "Noah",
         "Paula", "Ravi", "Sofia"]  # 60
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Warsaw",
          "Athens", "Cairo", "Nairobi", "Lagos", "Tokyo", "Seoul", "Beijing", "Delhi", "Mumbai", "Bangkok",
          "Jakarta", "Manila", "Sydney", "Auckland", "Toronto", "Chicago", "Boston", "Denver", "Seattle", "Miami",
          "Lima", "Bogota", "Santiago", "Havana", "Quito", "Istanbul", "Tehran", "Moscow", "Helsinki"]  # 40
JOBS = ["baker", "pilot", "nurse", "teacher", "lawyer", "painter", "farmer", "butcher", "dentist", "plumber",
        "tailor", "writer", "singer", "carpenter", "chemist", "gardener", "banker", "porter", "sailor", "miner",
        "barber", "fisher", "jeweler", "locksmith", "mechanic", "potter", "surgeon", "translator", "weaver",
        "librarian"]  # 30, none starting with a vowel ("works as a ...")
LOCKERS = [str(i) for i in range(1, 100)]
CODES = [str(i) for i in range(1000, 10000)]  # 9000 four-digit codes
FILLER = ["Okay.", "All quiet.", "It rained.", "Time passed.", "The sky was grey.", "A dog barked far away.",
          "The lamp flickered once.", "The kettle began to whistle.", "The clock ticked on the wall.",
          "A cold wind came from the north.",
          "Somebody laughed in the next room.", "The train was a little late that day.",
          "Leaves gathered along the fence.", "The radio played an old song.", "A cat slept on the warm step.",
          "The bread in the oven smelled good.", "Rain tapped against the window.", "The street was quiet.",
          "A bus stopped and drove on.", "Someone had left the door open.", "The coffee had gone cold.",
          "Birds sat in a row on the wire.", "The printer jammed again.", "A bell rang twice.",
          "The river was high after the storm.", "Nobody answered the phone.", "The snow melted by noon.",
          "The meeting ran long.", "A child drew circles in the sand.", "The shop opened at nine.",
          "The hallway smelled of fresh paint.", "The garden needed water."]
KINDS = ("lives", "locker", "job")  # meta["kind"] codes 0, 1, 2
POOLS = {"lives": CITIES, "locker": CODES, "job": JOBS}


def fact_pieces(kind: str, subject: str, value: str) -> list[str]:
    return {"lives": [f" {subject}", " lives in", f" {value}", "."],
            "locker": [" The code of locker", f" {subject}", " is", f" {value}", "."],
            "job": [f" {subject}", " works as a", f" {value}", "."]}[kind]


def question_pieces(kind: str, subject: str) -> list[str]:
    """The question up to and including " Answer:"; the answer piece and "." follow."""
    body = {"lives": [" Where does", f" {subject}", " live?"],
            "locker": [" What is the code of locker", f" {subject}", "?"],
            "job": [" What is the job of", f" {subject}", "?"]}[kind]
    return [" Question:"] + body + [" Answer:"]


def link_pieces(name2: str, name1: str) -> list[str]:
    return [f" {name2}", " lives where", f" {name1}", " lives."]


class RecallTask(Task):
    name = "recall"

    def __init__(self, window: int = 128, k=(1, 3), facts=(1, 4), queries: int = 1, hops=1,
                 tokenizer_dir: str | None = None, tokenizer=None):
        t = self.name
        self.window = check_int(t, "window", window, 8, 8192)
        self.k = check_range(t, "k", k, 1)
        self.facts = check_range(t, "facts", facts, 1)
        self.queries = check_int(t, "queries", queries, 1)
        self.hops = check_range(t, "hops", hops, 1)
        if self.facts[1] > 16:
            raise ValueError(f"{t}: facts must be at most 16, got {json_range(facts)}")
        if self.queries > self.facts[0]:
            raise ValueError(f"{t}: queries must be at most the fewest facts ({self.facts[0]}), got {self.queries}")
        if self.hops[1] > 2:
            raise ValueError(f"{t}: hops must be 1 or 2, got {json_range(hops)}")
        self.seq_len = (self.k[1] + 1) * self.window
        if self.seq_len > MAX_SEQ_LEN:
            raise ValueError(f"{t}: (k_hi + 1) * window = {self.seq_len} tokens is over {MAX_SEQ_LEN}")
        self.tokenizer = load_tokenizer(t, tokenizer, tokenizer_dir)
        self.params = {"window": self.window, "k": json_range(k), "facts": json_range(facts),
                       "queries": self.queries, "hops": json_range(hops),
                       "tokenizer_dir": None if tokenizer_dir is None else str(tokenizer_dir)}
        self.pieces = Pieces(t, self.tokenizer)
        self._filler = sorted(((self.pieces.join([" " + s]), s) for s in FILLER), key=lambda x: len(x[0]))
        self._filler_len = [len(ids) for ids, _ in self._filler]
        self._check_fit()

    def _check_fit(self):
        """Worst case, measured in the tokenizer's pieces: every fact (and link) in one window; all questions."""
        P, t, L = self.pieces, self.name, self.window
        name, city, job = P.longest(" " + x for x in NAMES), P.longest(" " + x for x in CITIES), \
            P.longest(" " + x for x in JOBS)
        locker, code = P.longest(" " + x for x in LOCKERS), P.longest(" " + x for x in CODES)
        slot = {"lives": (name, city), "locker": (locker, code), "job": (name, job)}

        def fixed(pieces):  # tokens of the template pieces without the slots
            return sum(len(P(p)) for p in pieces if p.strip() not in ("S", "V"))

        fact = max(fixed(fact_pieces(kd, "S", "V")) + sum(slot[kd]) for kd in KINDS)
        link = fixed(link_pieces("S", "S")) + 2 * name
        qa = max(fixed(question_pieces(kd, "S")) + slot[kd][0] + slot[kd][1] + len(P(".")) for kd in KINDS)
        load = self.facts[1] * fact + (self.queries * link if self.hops[1] == 2 else 0)
        if load > L:
            raise ValueError(f"{t}: context cannot fit the requested length with this tokenizer: {self.facts[1]} "
                             f"facts (and links) may share one window and take up to {load} tokens, over window {L}")
        if self.queries * qa > L:
            raise ValueError(f"{t}: context cannot fit the requested length with this tokenizer: {self.queries} "
                             f"question(s) of <= {qa} tokens do not fit the final window of {L} tokens")

    # ---- one example

    def _fill(self, rng: random.Random, g: int) -> list[int]:
        """Exactly g tokens of filler sentences (spacers where no sentence fits)."""
        out = []
        while g > 0:
            fits = bisect_right(self._filler_len, g)
            if fits == 0:
                out += [self.pieces.spacer] * g
                break
            ids = self._filler[rng.randrange(fits)][0]
            out += ids
            g -= len(ids)
        return out

    def _window(self, rng: random.Random, items: list[list[int]], final: list[int] | None = None):
        """One window of exactly L tokens: items at random offsets among filler (final: right-aligned);
        -> (tokens, start offset of each item, start offset of final)."""
        free = self.window - sum(map(len, items)) - (len(final) if final else 0)
        assert free >= 0, "checked by _check_fit"
        cuts = sorted(rng.randint(0, free) for _ in items)
        gaps = [b - a for a, b in zip([0] + cuts, cuts + [free])]
        out, starts = [], []
        for gap, item in zip(gaps, items):
            out += self._fill(rng, gap)
            starts.append(len(out))
            out += item
        out += self._fill(rng, gaps[-1])
        final_start = len(out)
        if final:
            out += final
        return out, starts, final_start

    def _example(self, rng: random.Random):
        P, L, Q = self.pieces, self.window, self.k[1]
        m = rng.randint(*self.facts)
        hops = [rng.randint(*self.hops) for _ in range(self.queries)]
        kinds = [KINDS.index("lives") if j < self.queries and hops[j] == 2 else rng.randrange(3) for j in range(m)]
        names = iter(rng.sample(NAMES, m + self.queries))
        lockers = iter(rng.sample(LOCKERS, m))
        facts = []  # (kind, subject, value, k)
        for j in range(m):
            kind = KINDS[kinds[j]]
            subject = next(lockers) if kind == "locker" else next(names)
            facts.append((kind, subject, rng.choice(POOLS[kind]), rng.randint(*self.k)))
        per_window = [[] for _ in range(Q)]  # (tag, tokens); tag = ("fact", j) or ("link", j)
        for j, (kind, subject, value, k) in enumerate(facts):
            per_window[Q - k].append((("fact", j), P.join(fact_pieces(kind, subject, value))))
        asked = []  # (kind, subject, answer, k, hops, k_link)
        for j in range(self.queries):
            kind, subject, value, k = facts[j]
            if hops[j] == 2:
                name2, k_link = next(names), rng.randint(1, k)
                per_window[Q - k_link].append((("link", j), P.join(link_pieces(name2, subject))))
                asked.append((kind, name2, value, k, 2, k_link))
            else:
                asked.append((kind, subject, value, k, 1, 0))
        order = list(range(self.queries))
        rng.shuffle(order)
        tokens, fact_start = [], [0] * self.queries
        for w in range(Q):
            rng.shuffle(per_window[w])
            ids, starts, _ = self._window(rng, [item for _, item in per_window[w]])
            for (tag, _), s in zip(per_window[w], starts):
                if tag[0] == "fact" and tag[1] < self.queries:
                    fact_start[tag[1]] = w * L + s
            tokens += ids
        qa, answer_start, answer_len, question_start = [], [0] * self.queries, [0] * self.queries, [0] * self.queries
        for j in order:
            kind, subject, value, *_ = asked[j]
            question_start[j] = len(qa)
            qa += P.join(question_pieces(kind, subject))
            answer_start[j] = len(qa)
            answer = P(f" {value}")
            answer_len[j] = len(answer)
            qa += answer + P(".")
        ids, _, qa_start = self._window(rng, [], final=qa)
        base = Q * L + qa_start
        tokens += ids
        assert len(tokens) == self.seq_len
        return tokens, {
            "k": [a[3] for a in asked], "hops": [a[4] for a in asked], "k_link": [a[5] for a in asked],
            "kind": [KINDS.index(a[0]) for a in asked], "facts": m, "fact_start": fact_start,
            "question_start": [base + s for s in question_start], "answer_start": [base + s for s in answer_start],
            "answer_len": answer_len, "chance": [1.0 / len(POOLS[a[0]]) for a in asked]}

    def sample(self, n: int, seed: int) -> Batch:
        return build_batch(self.name, n, seed, self.seq_len, self._example, self.name)

    def score(self, logits_or_predictions, batch: Batch) -> dict[str, float]:
        """acc: exact answers (every answer token right) over all questions; acc_k{k}: by windows since the
        fact; acc_facts{m}: by facts stated; acc_hops{h}; chance = no-memory = mean 1/candidate pool."""
        meta = batch.meta
        hits = span_hits(self.name, logits_or_predictions, batch, meta["answer_start"], meta["answer_len"])
        facts = np.broadcast_to(meta["facts"][:, None], hits.shape)
        out = text_score(hits.ravel(), {"acc_k": meta["k"].ravel(), "acc_facts": facts.ravel(),
                                        "acc_hops": meta["hops"].ravel()})
        chance = float(meta["chance"].mean())
        out.update(chance=chance, nomem=chance)  # every fact is evicted (k >= 1) before its question
        return out
