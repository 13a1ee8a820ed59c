"""GSM-Infinite (Kabra et al. 2025) in natural text and the model's own tokenizer: question first, then a long
context of needed and noise statements, then " Answer:" and the answer (no chain of thought).

Subsets (after the reference generator, Infini-AI-Lab/gsm_infinite; differences are listed in docs/TASKS.md):
- symbolic: `ops` variables V000000..V999999 in a random tree: the root is "assign V = 7." (0..10), each
  other node "assign V = W.", "assign V = W + 1." or "assign V = W - 1." for its parent W. Noise: another
  tree whose root is never assigned, so none of it can be derived. The question asks which variables equal
  a value (drawn from the tree's nodes); the answer lists them in ascending order: " V000123, V004567".
- medium / hard: entity problems (zoo animals in places, schools in cities, movies at festivals), each
  quantity defined by one sentence: "The number of adult bear in South Zoo equals 3.", "... equals 2 times
  the number of adult wolf in Cedar Valley.", "... equals 3 plus ...", "... equals the sum of A and B.",
  "... equals the difference between A and B.", "... equals 2 times the sum of A and B.", "... equals the sum
  of A, B, and C.", "... equals the number of adult fox in Pine Ridge."; and implicit totals: "the total
  number of adult animals in South Zoo" is the sum over the animals stated for that place. hard adds the
  averages ("the average number of newborn children per adult bear in South Zoo") and the total
  "the total number of newborn animal children in South Zoo" = sum of average * number over its animals.
  ops counts operands as the reference does: one per number or quantity a needed sentence reads (a total
  over m animals: m; a newborn total: 2m). Noise: the same sentences about other places, never needed.
  Values stay in 1..999 (no modulus), numbers drawn from 1..4 (times: 2..4), as the reference's number_range 5.

Sequence: <pad>... " Question: ... Problem: <statements in random order> Answer: 12", left-padded to
T = length_hi. The content (question to answer) is filled with noise statements until the next one would pass
a target drawn per example from U[length_lo, length_hi] tokens. loss_mask: the answer tokens after " Answer:".
Each example comes from random.Random("gsm-infinite/<seed>/<i>"): sample(n + 1) extends sample(n).
"""

from __future__ import annotations

import random

import numpy as np

from common.tasks.base import Batch, Task, check_int, check_range, json_range
from common.tasks.recall import MAX_SEQ_LEN, Pieces, build_batch, load_tokenizer, span_hits, text_score

SUBSETS = ("symbolic", "medium", "hard")
MAX_OPS = 20
NUMBER_RANGE = 5  # numbers in sentences are 1..NUMBER_RANGE-1 (a factor: 2..NUMBER_RANGE-1), as the reference's
MAX_VALUE = 999  # examples with a quantity outside 1..MAX_VALUE are drawn again (the reference rejects > 1e3)

SYMBOLIC_QUESTION = (" Question: The context contains relationships between variables, all satisfied"
                     " simultaneously. Using only these relationships, which variables (if any) from which values"
                     " can be derived are equal to")

# Per template: the places of the problem, the places of the noise (disjoint), the item types, the phrases.
TEMPLATES = {
    "zoo": dict(
        places=["South Zoo", "Cedar Valley", "Beverly Forest", "Pine Ridge", "Maple Creek", "Jefferson Circus",
                "Mayer Aquarium", "Bundle Ranch", "Hamilton Farm", "Oakridge Riverside"],
        noise_places=["Louvre Museum", "Olympus Mons", "Gale Crater", "Atlantis", "Avalon", "Camelot",
                      "Pacific Ocean", "Coral Sea", "Hellas Basin", "El Dorado", "Valhalla", "Xanadu",
                      "Arctic Ocean", "Prado Museum", "Utopia Planitia", "Shangri-La", "Sargasso Sea",
                      "Tate Modern", "Elysium Mons", "Hyperborea", "Caribbean Sea", "British Museum",
                      "Arabia Terra", "Lemuria", "Indian Ocean", "Uffizi Gallery", "Syrtis Major", "Cibola",
                      "Southern Ocean", "Rijksmuseum", "Chryse Planitia", "Mount Meru"],
        items=["bear", "wolf", "deer", "fox", "racoon", "eagle", "parrot", "owl", "blue jay", "crow"],
        count="the number of adult {item} in {place}", question="How many adult {item} does {place} have?",
        total="the total number of adult animals in {place}",
        avg="the average number of newborn children per adult {item} in {place}",
        total2="the total number of newborn animal children in {place}"),
    "school": dict(
        places=["Evervale City", "Hawkesbury", "Glenfield City", "Westhaven City", "Brightford", "Riverton City",
                "Clearwater Bay", "Shoreline City", "Oakbridge City", "Ruby Bay"],
        noise_places=["Ashford", "Bellmont", "Copperfield", "Dunmore", "Eastwick", "Fairhaven", "Greystone",
                      "Hollowbrook", "Ironwood", "Juniper Falls", "Kingsbridge", "Lakemont", "Millbrook",
                      "Northgate", "Old Harbor", "Pinecrest", "Queensbury", "Redcliff", "Silverlake", "Thornbury",
                      "Upton Vale", "Violet Hill", "Willowdale", "Yarrow Point", "Amberly", "Birchwood",
                      "Coldspring", "Deerfield", "Elmstead", "Foxborough", "Granite Bay", "Heatherton"],
        items=["elementary school", "private middle school", "public highschool", "regional medical school",
               "culinarian school", "art academy", "music conservatory", "technical college", "law school",
               "language school"],
        count="the number of {item} in {place}", question="How many {item} does {place} have?",
        total="the total number of schools in {place}",
        avg="the average number of teachers per {item} in {place}",
        total2="the total number of teachers from all schools in {place}"),
    "movie": dict(
        places=["Taylor Movie Festival", "Verdi Movie Festival", "West Sahara Movie Festival",
                "Northwood Movie Festival", "Golden Banana Movie Festival", "Festival Lumiere de Valmont",
                "Reves de Belleville", "Cinema de Montreval", "Festival de Clairmont", "Festival de Saint-Rivage"],
        noise_places=["Blue Harbor Film Week", "Crimson Reel Awards", "Silver Screen Gala", "Desert Lens Festival",
                      "Northern Lights Cinema Days", "Harborview Film Days", "Maple Leaf Screenings",
                      "Sunset Boulevard Showcase", "Riverbank Film Fair", "Emerald Isle Film Week",
                      "Starlight Movie Nights", "Granite Peak Film Meet", "Velvet Curtain Awards",
                      "Ocean Breeze Film Fest", "Lantern Film Fest", "Copper Canyon Screenings",
                      "Winter Frost Film Days", "Autumn Leaf Film Gala", "Harvest Moon Cinema", "Redwood Film Fair",
                      "Amber Coast Festival", "Skyline Cinema Week", "Marble Hall Film Days", "Cedar Film Awards",
                      "Orchid Film Festival", "Ivory Tower Film Gala", "Thunder Bay Screenings",
                      "Quiet Valley Film Fair", "Saffron Film Week", "Bluebell Cinema Days", "Iron Gate Film Fest",
                      "Willow Creek Film Gala"],
        items=["upbeat metropolis comedy", "solemn period drama", "futuristic sci-fi movie", "calm road movie",
               "intense detective thriller", "gothic horror movie", "upbeat fantasy musical", "intense sports drama",
               "urban love comedy", "mythical adventure movie"],
        count="the number of {item} in {place}", question="How many {item} does {place} have?",
        total="the total number of movies in {place}",
        avg="the average number of nominations per {item} in {place}",
        total2="the total number of movie nominations in {place}"),
}
TEMPLATE_ORDER = ("zoo", "school", "movie")
TEMPLATE_WEIGHTS = (2, 1, 1)  # the reference generates twice as many zoo problems as each of the others


def phrase(tpl: dict, key: tuple) -> str:
    """("count", place, item) / ("avg", place, item) / ("total", place) / ("total2", place) -> its noun phrase."""
    kind, place = key[0], key[1]
    item = key[2] if len(key) > 2 else ""
    return tpl[kind].format(place=place, item=item)


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


class _Retry(Exception):
    """The drawn problem is out of range (a value, or names ran out): draw again."""


class _Realistic:
    """One medium/hard problem: a tree of quantities with exactly `ops` operands, built top-down."""

    def __init__(self, rng: random.Random, tpl: dict, hard: bool):
        self.rng, self.tpl, self.hard = rng, tpl, hard
        self.used, self.claimed, self.used_places = set(), set(), set()
        self.sentences = []  # (key, pieces) of needed statements
        self.values = {}

    def instance(self, kind="count") -> tuple:
        free = [(p, it) for p in self.tpl["places"] if p not in self.claimed for it in self.tpl["items"]
                if (kind, p, it) not in self.used]
        if not free:
            raise _Retry
        place, item = self.rng.choice(free)
        key = (kind, place, item)
        self.used.add(key)
        self.used_places.add(place)
        return key

    def number(self, lo=1) -> int:
        return self.rng.randint(lo, NUMBER_RANGE - 1)

    def build(self, budget: int, key=None) -> tuple:
        """A quantity whose defining subtree reads exactly `budget` operands; -> its key (value in self.values)."""
        rng = self.rng
        forms = ["const"] if budget == 1 else ["copy"]
        if budget >= 3:
            forms.append("k1")
        if budget >= 4:
            forms.append("op2")
        if budget >= 5:
            forms.append("k2")
        if budget >= 6:
            forms.append("sum3")
        if key is None and budget >= 2:
            forms.append("total")
            if self.hard and budget >= 4:
                forms.append("total2")
        form = rng.choice(forms)
        if form in ("total", "total2"):
            return self.total(budget, form)
        if key is None:
            key = self.instance(rng.choice(["count", "avg"]) if self.hard else "count")
        P = " " + cap(phrase(self.tpl, key))
        if form == "const":
            v = self.number()
            pieces = [P, " equals", f" {v}", "."]
        elif form == "copy":
            a = self.build(budget - 1)
            v = self.values[a]
            pieces = [P, " equals", " " + phrase(self.tpl, a), "."]
        elif form == "k1":
            times = rng.random() < 0.5
            k = self.number(2 if times else 1)
            a = self.build(budget - 2)
            v = k * self.values[a] if times else k + self.values[a]
            pieces = [P, " equals", f" {k}", " times" if times else " plus", " " + phrase(self.tpl, a), "."]
        elif form in ("op2", "k2"):
            rest = budget - (2 if form == "op2" else 3)
            left = rng.randint(1, rest - 1)
            a, b = self.build(left), self.build(rest - left)
            x, y = self.values[a], self.values[b]
            plus = rng.random() < 0.5 or x == y
            if not plus and x < y:
                a, b, x, y = b, a, y, x
            inner = x + y if plus else x - y
            words = [" the sum of" if plus else " the difference between", " " + phrase(self.tpl, a), " and",
                     " " + phrase(self.tpl, b)]
            if form == "op2":
                v, pieces = inner, [P, " equals"] + words + ["."]
            else:
                times = rng.random() < 0.5
                k = self.number(2 if times else 1)
                v = k * inner if times else k + inner
                pieces = [P, " equals", f" {k}", " times" if times else " plus"] + words + ["."]
        else:  # sum3
            rest = budget - 3
            cut = sorted(rng.sample(range(1, rest), 2))
            parts = [self.build(n) for n in (cut[0], cut[1] - cut[0], rest - cut[1])]
            v = sum(self.values[p] for p in parts)
            pieces = [P, " equals the sum of", " " + phrase(self.tpl, parts[0]) + ",",
                      " " + phrase(self.tpl, parts[1]) + ",", " and", " " + phrase(self.tpl, parts[2]), "."]
        if not 1 <= v <= MAX_VALUE:
            raise _Retry
        self.values[key] = v
        self.sentences.append((key, pieces))
        return key

    def total(self, budget: int, form: str) -> tuple:
        """A place's total: sum over its items (total) or of average * number (total2); the place is claimed,
        so no other statement of the problem mentions it."""
        rng, per = self.rng, (1 if form == "total" else 2)
        places = [p for p in self.tpl["places"] if p not in self.used_places]
        m_max = min(budget // (2 * per), len(self.tpl["items"]))
        if not places or m_max < 1:
            raise _Retry
        place = rng.choice(places)
        self.claimed.add(place)
        self.used_places.add(place)
        m = rng.randint(1, m_max)
        items = rng.sample(self.tpl["items"], m)
        rest = budget - per * m  # operands left for the children's own definitions (>= per * m)
        kids = per * m
        cuts = sorted(rng.sample(range(1, rest), kids - 1)) if kids > 1 else []
        budgets = [b - a for a, b in zip([0] + cuts, cuts + [rest])]
        value = 0
        for j, item in enumerate(items):
            count = ("count", place, item)
            self.used.add(count)
            self.build(budgets[per * j], count)
            if form == "total":
                value += self.values[count]
            else:
                avg = ("avg", place, item)
                self.used.add(avg)
                self.build(budgets[per * j + 1], avg)
                value += self.values[count] * self.values[avg]
        key = (form, place)
        if not 1 <= value <= MAX_VALUE:
            raise _Retry
        self.values[key] = value
        return key


class GsmInfiniteTask(Task):
    name = "gsm-infinite"

    def __init__(self, subset: str = "medium", ops=(2, 8), length=(1536, 2048), window: int = 512,
                 tokenizer_dir: str | None = None, tokenizer=None):
        t = self.name
        if subset not in SUBSETS:
            raise ValueError(f"{t}: subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
        self.subset = subset
        self.ops = check_range(t, "ops", ops, 1 if subset == "symbolic" else 2)
        if self.ops[1] > MAX_OPS:
            raise ValueError(f"{t}: ops must be at most {MAX_OPS}, got {json_range(ops)}")
        self.length = check_range(t, "length", length, 16)
        if self.length[1] > MAX_SEQ_LEN:
            raise ValueError(f"{t}: length must be at most {MAX_SEQ_LEN} tokens, got {json_range(length)}")
        self.window = check_int(t, "window", window, 8, MAX_SEQ_LEN)
        self.seq_len = self.length[1]
        self.tokenizer = load_tokenizer(t, tokenizer, tokenizer_dir)
        self.params = {"subset": subset, "ops": json_range(ops), "length": json_range(length), "window": self.window,
                       "tokenizer_dir": None if tokenizer_dir is None else str(tokenizer_dir)}
        self.pieces = Pieces(t, self.tokenizer)
        self._check_fit()

    def _check_fit(self):
        """The question, the needed statements and the answer of 16 problems at the most ops must fit length_lo."""
        worst = max(self._fixed_length(self._problem(random.Random(f"{self.name}/fit/{i}"), self.ops[1]))
                    for i in range(16))
        if worst > self.length[0]:
            raise ValueError(f"{self.name}: context cannot fit the requested length with this tokenizer: question, "
                             f"needed statements and answer take up to {worst} tokens at ops={self.ops[1]}, over "
                             f"length {self.length[0]}")

    def _fixed_length(self, problem) -> int:
        P = self.pieces
        return sum(len(P.join(p)) for p in [problem["question"], [" Answer:"], problem["answer"]] + problem["needed"])

    # ---- problems: {"question", "needed" (list of piece lists), "answer" (pieces), "noise" (iterator)}

    def _problem(self, rng: random.Random, ops: int) -> dict:
        if self.subset == "symbolic":
            return self._symbolic(rng, ops)
        for _ in range(1000):
            try:
                return self._realistic(rng, ops)
            except _Retry:
                continue
        raise ValueError(f"{self.name}: could not draw a problem with ops={ops} in range (values 1..{MAX_VALUE})")

    def _symbolic(self, rng: random.Random, ops: int) -> dict:
        used = set()

        def fresh() -> str:
            while True:
                v = rng.randrange(1_000_000)
                if v not in used:
                    used.add(v)
                    return f"V{v:06d}"

        def edge(child, parent):  # -> (pieces, change from the parent's value)
            op = rng.choice(["", "+", "-"])  # copy, + 1, - 1 with equal odds, as the reference
            tail = [f" {op}", " 1"] if op else []
            return [" assign", f" {child}", " =", f" {parent}"] + tail + ["."], {"": 0, "+": 1, "-": -1}[op]

        names = [fresh() for _ in range(ops)]
        values = [rng.randint(0, 10)]
        needed = [[" assign", f" {names[0]}", " =", f" {values[0]}", "."]]
        for i in range(1, ops):
            parent = rng.randrange(i)
            pieces, delta = edge(names[i], names[parent])
            values.append(values[parent] + delta)
            needed.append(pieces)
        query = rng.choice(values)
        answer_names = sorted(n for n, v in zip(names, values) if v == query)
        answer = [f" {answer_names[0]}"] + [p for n in answer_names[1:] for p in (",", f" {n}")]

        def noise():
            nodes = [fresh()]  # the noise tree's root: never assigned, so nothing below it is derivable
            while len(used) < 900_000:
                child = fresh()
                yield edge(child, rng.choice(nodes))[0]
                nodes.append(child)

        return {"question": [SYMBOLIC_QUESTION, f" {query}", "?", " Context:"], "needed": needed, "answer": answer,
                "noise": noise(), "answer_text": ", ".join(answer_names)}

    def _realistic(self, rng: random.Random, ops: int) -> dict:
        name = rng.choices(TEMPLATE_ORDER, weights=TEMPLATE_WEIGHTS)[0]
        tpl = TEMPLATES[name]
        problem = _Realistic(rng, tpl, hard=self.subset == "hard")
        root = problem.build(ops)
        if root[0] == "count":
            question = tpl["question"].format(place=root[1], item=root[2])
        else:
            question = f"What is {phrase(tpl, root)}?"
        value = problem.values[root]

        def noise():
            kinds = ["count", "avg"] if self.subset == "hard" else ["count"]
            free = [(k, p, it) for k in kinds for p in tpl["noise_places"] for it in tpl["items"]]
            rng.shuffle(free)
            done = []
            for key in free:
                P = " " + cap(phrase(tpl, key))
                form = rng.choice(["const", "k1", "op2"] if len(done) >= 2 else ["const"])
                if form == "const":
                    yield [P, " equals", f" {rng.randint(1, NUMBER_RANGE - 1)}", "."]
                elif form == "k1":
                    times = rng.random() < 0.5
                    yield [P, " equals", f" {rng.randint(2 if times else 1, NUMBER_RANGE - 1)}",
                           " times" if times else " plus", " " + phrase(tpl, rng.choice(done)), "."]
                else:
                    a, b = rng.sample(done, 2)
                    yield [P, " equals", rng.choice([" the sum of", " the difference between"]),
                           " " + phrase(tpl, a), " and", " " + phrase(tpl, b), "."]
                done.append(key)

        return {"question": [" Question:", " " + question, " Problem:"], "needed": [p for _, p in problem.sentences],
                "answer": [f" {value}"], "noise": noise(), "answer_text": str(value), "template": name}

    # ---- sampling

    def _example(self, rng: random.Random):
        P, T = self.pieces, self.seq_len
        ops = rng.randint(*self.ops)
        problem = self._problem(rng, ops)
        fixed = self._fixed_length(problem)
        if fixed > T:
            raise ValueError(f"{self.name}: context cannot fit the requested length with this tokenizer: an example "
                             f"with ops={ops} takes {fixed} tokens before noise, over length {T}")
        target = max(rng.randint(*self.length), fixed)
        statements = [(True, P.join(p)) for p in problem["needed"]]
        room = target - fixed
        for pieces in problem["noise"]:
            ids = P.join(pieces)
            if len(ids) > room:
                break
            statements.append((False, ids))
            room -= len(ids)
        rng.shuffle(statements)
        question, prefix, answer = P.join(problem["question"]), P(" Answer:"), P.join(problem["answer"])
        content = sum(len(ids) for _, ids in statements) + len(question) + len(prefix) + len(answer)
        pad = T - content
        tokens = [P.pad] * pad + question
        needed_starts = []
        for needed, ids in statements:
            if needed:
                needed_starts.append(len(tokens))
            tokens += ids
        tokens += prefix
        answer_start = len(tokens)
        tokens += answer
        assert len(tokens) == T
        final = (answer_start // self.window) * self.window  # start of the window that predicts the answer
        derivable = pad >= final and min(needed_starts) >= final  # question and needed statements all inside it
        return tokens, {"ops": ops, "answer_start": answer_start, "answer_len": len(answer),
                        "answer": problem["answer_text"], "statements": len(statements),
                        "noise": len(statements) - len(problem["needed"]), "content": content,
                        "nomem_derivable": derivable}

    def sample(self, n: int, seed: int) -> Batch:
        return build_batch(self.name, n, seed, self.seq_len, self._example, f"{self.name}/{self.subset}")

    def score(self, logits_or_predictions, batch: Batch) -> dict[str, float]:
        """acc: exact answers (every answer token right); acc_op{n} per op count; chance: always answering the
        batch's most frequent answer; nomem: a model that sees only the answer's window (hard eviction) and
        answers right when the question and every needed statement lie in it, else the most frequent answer."""
        meta = batch.meta
        hits = span_hits(self.name, logits_or_predictions, batch, meta["answer_start"], meta["answer_len"])[:, 0]
        out = text_score(hits, {"acc_op": meta["ops"]})
        out.update(chance=majority_rate(meta["answer"]),
                   nomem=float((most_frequent(meta["answer"]) | meta["nomem_derivable"]).mean()))
        for op in np.unique(meta["ops"]):  # the most frequent answer among the examples with that op count
            out[f"chance_op{int(op)}"] = majority_rate(meta["answer"][meta["ops"] == op])
        return out


def most_frequent(answers: np.ndarray) -> np.ndarray:
    """bool [n]: whether each answer is the batch's most frequent one (ties: the smallest in sort order)."""
    values, counts = np.unique(answers, return_counts=True)
    return answers == values[counts.argmax()]


def majority_rate(answers: np.ndarray) -> float:
    return float(most_frequent(answers).mean())
