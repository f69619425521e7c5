"""`--attention-backend sglang_evict`: attention over each (request, KV head)'s live head-slots.

Per step, `init_forward_metadata` asks the HeadKVCache for the new tokens' head-slots and the
per-layer ragged lists (FlashInfer layout: sequence r*H + h is request r with KV head h and its
group of query heads, so a GPU build can hand the same indptr/indices to FlashInfer). Per layer,
K, V, log beta and the position are stored in one pass, then attention reads only live
head-slots: Triton kernels where they compile for real (CUDA, or `--evict-kernel triton`), the
vectorised torch paths on CPU, or FlashInfer's paged kernels over the same lists
(`--evict-kernel flashinfer`, CUDA, eager decode: each layer is planned on the host from the
lists' host mirror). Survivors keep their stored positions (keys are post-RoPE and
never re-rotated); causality in extend is decided by stored position, not by list order.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_evict.kernels import head_store, ragged_attention, ragged_attention_torch
from sglang_evict.errors import HeadEvictError


class HeadSlotAttnBackend(AttentionBackend):
    def __init__(self, runner, cache, config, gates=lambda: None):
        super().__init__()
        self.cache = cache
        # () -> the model's attached gates (their log beta pending per layer), or None
        self._gates = gates
        self.device = runner.device
        self.req_to_token = runner.req_to_token_pool.req_to_token
        self._flashinfer = None
        kernel = config.attention_kernel(runner.device)
        if kernel == "flashinfer":
            from sglang_evict.kernels.flashinfer_lists import FlashInferLists

            self._store = head_store.store_head_slots
            self._flashinfer = FlashInferLists(
                cache.num_layers, runner.model_config.num_attention_heads, cache.num_kv_heads,
                runner.device,
            )
            cache.host_metadata = True
        elif kernel == "triton":
            self._store = head_store.store_head_slots
            self._decode = ragged_attention.ragged_decode_attention
            self._extend = ragged_attention.ragged_extend_attention
        else:
            self._store = head_store.store_head_slots_torch
            self._decode = ragged_attention_torch.ragged_decode_attention_torch
            self._extend = ragged_attention_torch.ragged_extend_attention_torch

    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_idle():
            return
        self.cache.prepare(forward_batch, self.req_to_token)
        if self._flashinfer is not None:
            step = self.cache.step
            self._flashinfer.begin_step(step.indptr_host, step.indices, step.q_lens)

    # ------------------------------------------------------------------ CUDA graphs (decode)
    # Allocation, list appends and the step metadata run outside the graph (they decide on the
    # host); the graph holds the per-layer store and attention, which read the step's new
    # head-slots, indptr and indices from static buffers whose addresses never change.
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        if self._flashinfer is not None:  # refused at start-up already (evict_refusals)
            raise HeadEvictError("--evict-kernel flashinfer runs decode eagerly: add --disable-cuda-graph")
        self.cache.init_graph(max_bs)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        bs = forward_batch.batch_size
        if in_capture:
            self.cache.prepare_capture(bs)
            return
        if getattr(forward_batch, "actual_forward_mode", forward_batch.forward_mode).is_idle():
            self.cache.prepare_capture(bs)  # a padded idle replay: nothing real to store
            return
        self.cache.prepare_replay(forward_batch, bs, getattr(forward_batch, "num_padding", 0))

    def init_forward_metadata_in_graph(self, forward_batch):
        return None  # everything the graph reads was written by init_forward_metadata_out_graph

    def get_cuda_graph_seq_len_fill_value(self):
        return 1  # padded requests: their lists are empty whatever their length

    def _log_beta(self, layer_id: int, n: int, like: torch.Tensor) -> torch.Tensor:
        gates = self._gates()
        if gates is not None:
            pending = gates.pending.pop(layer_id, None)
            if pending is not None:
                return pending[0]
        # No gates: entries carry log beta 0 (beta = 1, never decays); policies that need
        # scores without gates (streaming, random, knorm) do not read it.
        return torch.zeros(n, self.cache.num_kv_heads, dtype=torch.float32, device=like.device)

    def _save(self, k, v, layer, forward_batch):
        n = k.shape[0]
        H = layer.tp_k_head_num
        log_beta = self._log_beta(layer.layer_id, n, k)
        self.cache.store(
            layer.layer_id,
            k.view(-1, H, layer.qk_head_dim),
            v.view(-1, H, layer.v_head_dim),
            log_beta,
            forward_batch.positions,
            self._store,
        )

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None and v is not None:
            self._save(k, v, layer, forward_batch)
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if self._flashinfer is not None:
            o = self._flashinfer.run(layer.layer_id, q_, self.cache.k, self.cache.v, layer.scaling)
            return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)
        indptr, indices = self.cache.step.layer(layer.layer_id)
        o = self._extend(
            q_,
            forward_batch.positions,
            self.cache.q_req,
            self.cache.k,
            self.cache.v,
            self.cache.pos,
            indptr,
            indices,
            layer.scaling,
            num_kv_heads=layer.tp_k_head_num,
            positions_sorted=True,  # the live lists are kept in position order
        )
        return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        if save_kv_cache and k is not None and v is not None:
            self._save(k, v, layer, forward_batch)
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if self._flashinfer is not None:
            o = self._flashinfer.run(layer.layer_id, q_, self.cache.k, self.cache.v, layer.scaling)
            return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)
        indptr, indices = self.cache.step.layer(layer.layer_id)
        o = self._decode(q_, self.cache.k, self.cache.v, indptr, indices, layer.scaling)
        return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def support_triton(self):
        return False
