"""The embedded default model is materialised once and a half-written folder is never used."""

from __future__ import annotations

import json
import shutil

from sglang_evict import default_model


def test_materialised_folder_is_the_default_llama(default_model_path):
    config = json.loads((default_model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_attention_heads"]) == (30, 9)
    assert (config["num_key_value_heads"], config["head_dim"]) == (3, 64)
    assert "quantization_config" not in config
    assert default_model.verify(default_model_path)


def test_source_checksum_recorded(default_model_path):
    marker = json.loads((default_model_path / default_model.MARKER).read_text())
    assert marker["gguf_sha256"] == default_model._sha256(default_model.gguf_path())
    assert default_model.verify(default_model_path, marker["gguf_sha256"])
    assert not default_model.verify(default_model_path, "0" * 64)


def test_incomplete_folders_are_rejected(default_model_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(default_model_path, copy)
    assert default_model.verify(copy)

    (copy / default_model.MARKER).unlink()  # interrupted before the marker was written
    assert not default_model.verify(copy)

    shutil.copy(default_model_path / default_model.MARKER, copy / default_model.MARKER)
    with open(copy / "model.safetensors", "r+b") as f:  # truncated weights
        f.truncate(1000)
    assert not default_model.verify(copy)

    (copy / default_model.MARKER).write_text("{broken")
    assert not default_model.verify(copy)


def test_resolve_reuses_verified_folder(default_model_path, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("materialise must not run when a verified folder exists")

    monkeypatch.setattr(default_model, "materialise", fail)
    assert default_model.resolve() == default_model_path


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLANG_EVICT_HOME", str(tmp_path))
    assert default_model.default_model_dir() == tmp_path / "models" / default_model.DEFAULT_MODEL_NAME
