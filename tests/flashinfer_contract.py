"""FlashInfer's paged prefill contract in torch, for CPU tests of what the backend hands it
(FlashInfer itself needs CUDA; bench/gpu_kernels.py runs the real one)."""

from __future__ import annotations

import math

import torch


class PagedPrefillTorch:
    """FlashInfer's BatchPrefillWithPagedKVCacheWrapper contract (NHD, the subset used): plan
    takes host qo/kv indptr, device page indices, last page lengths; run attends sequence i's
    queries to its pages with the bottom-right causal mask (query j of n sees kv entries
    0 .. m - n + j)."""

    def __init__(self, workspace, kv_layout):
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        self.plans = 0

    def plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads,
             head_dim, page_size, *, head_dim_vo, causal, sm_scale, q_data_type, kv_data_type):
        assert qo_indptr.device.type == "cpu" and kv_indptr.device.type == "cpu"
        assert qo_indptr.dtype == kv_indptr.dtype == kv_indices.dtype == torch.int32
        assert page_size == 1 and num_kv_heads == 1 and causal
        assert bool((last_page_len == 1).all()) and len(last_page_len) == len(kv_indptr) - 1
        assert int(kv_indptr[0]) == 0 and int(kv_indptr[-1]) == kv_indices.numel()
        self.qo, self.kv, self.idx = qo_indptr.long(), kv_indptr.long(), kv_indices.long()
        self.scale, self.group = sm_scale, num_qo_heads
        self.plans += 1

    def run(self, q, kv):
        k, v = kv
        assert q.shape[1] == self.group and k.shape[1:3] == (1, 1)
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        for i in range(len(self.kv) - 1):
            q0, q1 = int(self.qo[i]), int(self.qo[i + 1])
            slots = self.idx[int(self.kv[i]) : int(self.kv[i + 1])]
            n, m = q1 - q0, slots.numel()
            if n == 0:
                continue
            s = torch.einsum("ngd,md->gnm", q[q0:q1].float(), k[slots, 0, 0].float()) * self.scale
            mask = torch.arange(m)[None, :] > (torch.arange(n)[:, None] + m - n)
            p = s.masked_fill(mask, -math.inf).softmax(-1)
            out[q0:q1] = torch.einsum("gnm,md->ngd", p, v[slots, 0, 0].float()).to(q.dtype)
        return out
