"""The score store and the gate attachment's model checks (pure torch, no server)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sglang_evict.kernels.kv_store import paged_view, store_kv_scores_reference
from sglang_evict.patches.gate_attach import GateAttachError, decoder_layers
from sglang_evict.patches.request_meta import request_stats
from sglang_evict.cache.score_store import UNWRITTEN_POS, ScoreStore, bytes_per_slot


def test_layout_matches_the_store_kernel():
    store = ScoreStore(num_slots=12, num_layers=2, num_kv_heads=3, page_size=4, device="cpu")
    assert store.log_beta.shape == (2, 3, 4, 3) and store.pos.shape == (3, 4)
    assert store.nbytes == 12 * bytes_per_slot(2, 3)
    assert (store.pos == UNWRITTEN_POS).all() and (store.log_beta == 0).all()

    k_cache = torch.zeros(12, 3, 8)
    v_cache = torch.zeros(12, 3, 8)
    loc = torch.tensor([5, 0, 11])
    log_beta = -torch.rand(3, 3)
    positions = torch.tensor([7, 8, 9])
    store_kv_scores_reference(
        paged_view(k_cache, 4), paged_view(v_cache, 4), store.log_beta[1], store.pos,
        torch.randn(3, 3, 8), torch.randn(3, 3, 8), log_beta, positions, loc,
    )
    read_lb, read_pos = store.read(loc)
    assert torch.equal(read_lb[1], log_beta) and torch.equal(read_pos, positions)
    assert torch.equal(read_lb[0], torch.zeros(3, 3))  # other layers untouched
    assert torch.equal(store.log_beta_flat(1)[loc], log_beta)


def test_slots_must_fill_whole_pages():
    with pytest.raises(ValueError, match="multiple of page_size"):
        ScoreStore(10, 1, 1, 4, "cpu")


def test_request_stats_average_over_tokens():
    store = ScoreStore(8, 2, 2, 1, "cpu")
    store.log_beta[:, :, 0, :] = torch.arange(32, dtype=torch.float32).view(2, 8, 2) * -0.1
    stats = request_stats(store, torch.tensor([1, 3]))
    expected = store.log_beta[:, [1, 3], 0, :].double().mean(dim=1)
    assert stats["scored_tokens"] == 2
    assert torch.allclose(torch.tensor(stats["mean_log_beta_per_layer_head"], dtype=torch.float64), expected)
    assert torch.allclose(torch.tensor(stats["mean_log_beta_per_layer"], dtype=torch.float64), expected.mean(dim=1))


class _Attention(nn.Module):
    def forward(self, positions, hidden_states, forward_batch):
        return hidden_states


class _OddAttention(nn.Module):
    def forward(self, hidden_states, positions):
        return hidden_states


def _model(attention_cls, n=2):
    model = nn.Module()
    model.model = nn.Module()
    layers = []
    for _ in range(n):
        layer = nn.Module()
        layer.self_attn = attention_cls()
        layers.append(layer)
    model.model.layers = nn.ModuleList(layers)
    return model


def test_decoder_layers_found_for_llama_like_models():
    found = decoder_layers(_model(_Attention, 3))
    assert [i for i, _ in found] == [0, 1, 2]


def test_models_the_gates_cannot_attach_to_fail_by_name():
    class Mamba(nn.Module):
        pass

    with pytest.raises(GateAttachError, match="cannot attach retention gates to Mamba: it has no model.layers"):
        decoder_layers(Mamba())
    with pytest.raises(GateAttachError, match=r"_OddAttention.forward takes \['hidden_states', 'positions'\]"):
        decoder_layers(_model(_OddAttention))


def test_finished_request_stats_are_bounded(monkeypatch):
    from types import SimpleNamespace

    from sglang_evict.config import EvictConfig
    from sglang_evict.patches import gate_attach, request_meta
    from sglang_evict.patches.runtime import Runtime

    state = gate_attach.GateAttachment(EvictConfig(), gates=None, num_layers=1, num_kv_heads=1)
    state.store = ScoreStore(4, 1, 1, 1, "cpu")
    rt = Runtime(EvictConfig())
    rt.gates = state
    monkeypatch.setattr(request_meta, "MAX_PENDING_STATS", 3)
    rows = SimpleNamespace(req_to_token=torch.tensor([[0, 1, 2, 3]]))
    tree_cache = SimpleNamespace(req_to_token_pool=rows)
    for i in range(5):
        kv = SimpleNamespace(req_pool_idx=0, kv_committed_len=2)
        req = SimpleNamespace(rid=f"r{i}", finished=lambda: True, kv=kv)
        request_meta.before_release_kv_cache(rt, req, tree_cache)
    # Requests that were never streamed (aborted) cannot pile up: only the newest stay.
    assert list(rt.finished_stats) == ["r2", "r3", "r4"]
    assert rt.finished_stats["r4"]["scored_tokens"] == 2
