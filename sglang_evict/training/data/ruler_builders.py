"""Sample builders for RULER's needle tasks (niah, variable tracking) and our own (multi-turn
recall, plain essay text). Each returns (build(n), least n, first n to try, largest n)."""

from __future__ import annotations

import contextlib
import io
import random
import re
from collections.abc import Callable

from .fit import Built
from .ruler_scripts import RulerScripts, global_rng, rng_state
from .splits import split_of
from .tasks import MULTITURN_CHUNK_WORDS, TaskSpec


# Splits the RULER template between the user message and the answer prefix (which goes after
# the assistant tag in chat format). No '{', and none of the words niah.py rewrites
# ('Some', 'are', 'answers').
ANSWER_MARK = "@@ANSWER_PREFIX@@"


def ruler_template(kind: str) -> tuple[str, str]:
    from long_context_eval.data.synthetic.constants import TASKS

    return TASKS[kind]["template"], TASKS[kind].get("answer_prefix", "")


def essay_window(s: RulerScripts, split: str, rng: random.Random, words: int) -> list[str]:
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


def niah_builder(s: RulerScripts, spec: TaskSpec, split: str, seed: int, length: int, chat: bool):
    a = spec.args
    module = s.niah(a["type_haystack"])
    template, prefix = ruler_template("niah")
    args = module.args
    args.type_needle_k = a["type_needle_k"]
    args.type_needle_v = a["type_needle_v"]
    args.num_needle_v = int(a["num_needle_v"])
    args.num_needle_q = int(a["num_needle_q"])
    args.num_needle_k = max(int(a["num_needle_k"]), args.num_needle_q)  # as niah.py does
    args.random_seed = seed % 2**32  # niah.py shuffles the needles with Random(random_seed)
    args.template = template + ANSWER_MARK + prefix
    module.words = s.keys(split)
    if a["type_haystack"] == "essay":
        # Enough words for any fit (> 1 token per word), from a random place in our split.
        module.haystack = essay_window(s, split, random.Random(seed), 2 * length + 64)
        limit = len(module.haystack)
    else:
        limit = length  # lines of >= 1 token each

    def build(n: int) -> Built:
        with global_rng(seed):
            s.secrets, s.recording = [], True
            try:
                text, answers = module.generate_input_output(n)
            finally:
                s.recording = False
        user, answer_prefix = text.split(ANSWER_MARK)
        return Built(
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


def vt_builder(s: RulerScripts, spec: TaskSpec, split: str, seed: int, length: int, chat: bool):
    module = s.vt()
    template, prefix = ruler_template("variable_tracking")
    chains, hops = int(spec.args["num_chains"]), int(spec.args["num_hops"])
    # RULER's one-shot example alone is ~500 tokens; below 1K it would leave no room.
    fewshot = length >= 1024
    with global_rng(seed):
        icl = None
        if fewshot:
            module.args.template = template + prefix  # RULER builds the example untemplated
            with contextlib.redirect_stdout(io.StringIO()):
                example = module.sys_vartrack_w_noise_random(
                    num_samples=1, max_seq_length=500, incremental=5,
                    num_chains=chains, num_hops=hops,
                )[0]
            icl = example["input"] + " " + " ".join(example["outputs"]) + "\n\n"
        state = rng_state()
    module.args.template = template + ANSWER_MARK + prefix

    def build(n: int) -> Built:
        with global_rng(state=state):
            s.secrets, s.recording = [], True
            try:
                text, answer = module.generate_input_output(n, chains, hops, is_icl=False)
            finally:
                s.recording = False
            if icl is not None:
                # Where RULER's variable_tracking.main puts the example: before the task text.
                cut = text.index(template[:20])
                text = text[:cut] + " " + module.randomize_icl(icl) + "\n\n" + text[cut:]
        user, answer_prefix = text.split(ANSWER_MARK)
        return Built(
            s.format_prompt(user, answer_prefix, chat),
            [str(x) for x in answer],
            sorted(set(s.secrets)),
            " ".join(str(x) for x in answer),
        )

    return build, 1, 8, length


def draw_in_split(rng: random.Random, draw: Callable[[random.Random], str], split: str) -> str:
    while True:
        value = draw(rng)
        if split_of(value) == split:
            return value


def multiturn_builder(
    s: RulerScripts, spec: TaskSpec, split: str, seed: int, length: int, chat: bool
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
        draw_in_split(rng, lambda r: str(r.randint(10**6, 10**7 - 1)), split)
        for _ in keys
    ]
    asked = rng.randrange(num_facts)
    window = essay_window(s, split, rng, 2 * length + 64)
    replies = (
        "That is an interesting point.",
        "I see what the author means.",
        "This makes a fair argument.",
        "Thanks for sharing this passage.",
    )
    # Drawn up front so a build's text depends on n only through how much filler it takes.
    picks = [rng.randrange(len(replies)) for _ in range(len(window) // MULTITURN_CHUNK_WORDS + 1)]

    def build(n: int) -> Built:
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
        return Built(
            s.format_chat(turns, question, prefix, chat),
            [values[asked]],
            sorted(set(keys) | set(values)),
            f"{values[asked]}.",
        )

    return build, 0, 64, len(window)


def essay_builder(s: RulerScripts, spec: TaskSpec, split: str, seed: int, length: int, chat: bool):
    window = essay_window(s, split, random.Random(seed), 2 * length + 64)

    def build(n: int) -> Built:
        return Built(" ".join(window[:n]), [], [], "")

    return build, 1, 64, len(window)
