"""RULER's generator scripts imported in-process.

The RULER generators are command-line scripts: they parse argv and build their word lists at
import time. `RulerScripts` imports each script under a fixed argv and then sets only what a
sample needs on the imported module:

* `args` fields (needle types and counts, template, seed), as prepare.py would pass them;
* `haystack` for essay haystacks: a window of OUR split's part of the essay corpus (RULER
  always starts at the first essay, which would give every sample the same text);
* `words` (the adjective-noun keys) and the random-number/uuid/chain draws, restricted to our
  split's part of the key/value space (see `split_of`);
* `sent_tokenize`: an untrained `PunktSentenceTokenizer()` instead of NLTK's punkt model,
  which would have to be downloaded.

Not thread-safe: the imported modules and Python's/NumPy's global random state are shared
(the global states are saved and restored around every generator call).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import random
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from .splits import PairWords, essay_split_text, split_of
from .tasks import SPLITS, DataError, ruler_root


@contextlib.contextmanager
def global_rng(seed: int | None = None, state: tuple | None = None):
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


def rng_state() -> tuple:
    import numpy as np

    return (random.getstate(), np.random.get_state())


# ---------------------------------------------------------------------- RULER scripts


def _identity_tqdm(iterable=None, *args, **kwargs):
    return iterable


class RulerScripts:
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
        self._keys: dict[str, PairWords] | None = None

    # -- shared resources

    def essay_words(self, split: str) -> list[str]:
        if self._essays is None:
            # The same whitespace handling as niah.py's essay haystack.
            self._essays = {
                s: re.sub(r"\s+", " ", t).strip().split(" ")
                for s, t in essay_split_text().items()
            }
        return self._essays[split]

    def keys(self, split: str) -> PairWords:
        if self._keys is None:
            import wonderwords

            load = wonderwords.random_word._get_words_from_text_file
            adjectives = sorted(set(load("adjectivelist.txt")))
            nouns = sorted(set(load("nounlist.txt")))
            self._keys = {
                s: PairWords(adjectives, [n for n in nouns if split_of(n) == s]) for s in SPLITS
            }
        return self._keys[split]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    # -- importing the scripts

    def _import(self, script: str, argv: list[str], name: str) -> ModuleType:
        import long_context_eval.data.synthetic.constants as constants
        import long_context_eval.data.tokenizer as tokenizer_module
        import wonderwords

        path = ruler_root() / "data" / "synthetic" / f"{script}.py"
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
            with global_rng(), contextlib.redirect_stdout(io.StringIO()):
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


_SCRIPTS: dict[str, RulerScripts] = {}
_SCRIPTS_LOCK = threading.Lock()


def _default_tokenizer_path() -> str:
    from sglang_evict import default_model

    return str(default_model.resolve())


def ruler_scripts(tokenizer_path: str | os.PathLike[str] | None) -> RulerScripts:
    path = str(Path(tokenizer_path).expanduser().resolve()) if tokenizer_path else None
    path = path or _default_tokenizer_path()
    if not Path(path).is_dir():
        raise DataError(f"tokenizer folder {path} does not exist")
    with _SCRIPTS_LOCK:
        if path not in _SCRIPTS:
            _SCRIPTS[path] = RulerScripts(path)
        return _SCRIPTS[path]
