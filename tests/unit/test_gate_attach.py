"""The gate attachment: the models it attaches to, and the per-request gate statistics read
from the head-slots (pure torch, no server)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from head_cache_sim import CacheSim, make_cache
from sglang_evict.patches.gate_attach import GateAttachError, decoder_layers
from sglang_evict.patches.request_meta import request_stats

L, H = 2, 3


def test_request_stats_average_the_stored_log_beta_over_tokens():
    sim = CacheSim(make_cache(64, L, H, 8, policy=None))
    prompt = -torch.rand(5, H, generator=torch.Generator().manual_seed(1))
    step = -torch.rand(1, H, generator=torch.Generator().manual_seed(2))
    sim.step({0: 5}, log_beta=prompt)
    sim.step({0: 1}, log_beta=step)
    got = sim.cache.log_beta_of(sim.req_to_token[0, :6])
    # every layer stored the same scores here: the prompt's, then the decode step's
    expected = torch.cat([prompt, step]).expand(L, 6, H)
    assert torch.equal(got, expected)
    stats = request_stats(got)
    per_head = expected.double().mean(dim=1)
    assert stats["scored_tokens"] == 6
    assert torch.allclose(torch.tensor(stats["mean_log_beta_per_layer_head"],
                                       dtype=torch.float64), per_head)
    assert torch.allclose(torch.tensor(stats["mean_log_beta_per_layer"], dtype=torch.float64),
                          per_head.mean(dim=1))


def test_a_request_that_lost_entries_reports_no_gate_statistics():
    sim = CacheSim(make_cache(64, L, H, 8, policy="streaming", budget=4, buffer=2))
    sim.step({0: 12}, log_beta=None)
    assert int(sim.cache.row_stats(0).evicted) > 0
    assert sim.cache.log_beta_of(sim.req_to_token[0, :12]) is None


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

    rt = Runtime(EvictConfig())
    rt.gates = gate_attach.GateAttachment(EvictConfig(), gates=None, num_layers=L, num_kv_heads=H)
    sim = CacheSim(make_cache(64, L, H, 8, policy=None))
    sim.step({0: 4})
    rt.cache = sim.cache
    monkeypatch.setattr(request_meta, "MAX_PENDING_STATS", 3)
    tree_cache = SimpleNamespace(req_to_token_pool=SimpleNamespace(req_to_token=sim.req_to_token))
    for i in range(5):
        kv = SimpleNamespace(req_pool_idx=0, kv_committed_len=2)
        req = SimpleNamespace(rid=f"r{i}", finished=lambda: True, kv=kv)
        request_meta.before_release_kv_cache(rt, req, tree_cache)
    # Requests that were never streamed (aborted) cannot pile up: only the newest stay.
    assert list(rt.finished_stats) == ["r2", "r3", "r4"]
    assert rt.finished_stats["r4"]["scored_tokens"] == 2
