"""FlashInfer over the live lists (`--evict-kernel flashinfer`, CUDA where flashinfer is installed).

The step's metadata is already FlashInfer's: layer l's sequence s = r*H + h is (request r, KV
head h), indices[indptr[s]:indptr[s+1]] its live head-slots in position order. Each such sequence
is handed to FlashInfer's paged prefill/append kernel as a sequence with ONE KV head and its
group of G = Hq/H query heads, page size 1 (a page is one head-slot: K/V [capacity, D] viewed as
[capacity, 1, 1, D], NHD). The step's new tokens are the last entries of every list (appended
before attention), so FlashInfer's bottom-right causal mask is exactly the step's causality:
query i of a chunk of n attends the survivors and new tokens 0..i. Decode is the same call with
one query per sequence.

Planning is host work: the all-layer indptr comes from the lists' host mirror (no device read)
and each layer gets its own wrapper, planned at the layer's first call of the step (a wrapper's
plan is staged through its own pinned buffer, so plans of different layers never overwrite one
another before their copies ran).

Queries: a sequence's rows must be contiguous. For decode (one token per request) q [R, Hq, D]
viewed as [R*H, G, D] already is in sequence order. For extend, q [T, H, G, D] is gathered into
(request, head, token) order by `query_order` and the output scattered back.

`layer_plan` and `query_order` are the host-side layout, tested on CPU against the ragged torch
reference; the FlashInfer calls themselves run in bench/gpu_kernels.py where a GPU is lent.
"""

from __future__ import annotations

import torch

__all__ = ["FlashInferLists", "layer_plan", "query_order", "flashinfer_available"]

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace (split-KV partials)


def flashinfer_available() -> str | None:
    """None when FlashInfer can serve here, else why not (one line)."""
    if not torch.cuda.is_available():
        return "--evict-kernel flashinfer needs a CUDA device"
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # an install without its CUDA extension fails here, not later
        return f"--evict-kernel flashinfer: flashinfer cannot be imported ({type(e).__name__}: {e})"
    return None


def layer_plan(indptr_host: torch.Tensor, layer: int, seqs: int) -> tuple[torch.Tensor, int, int]:
    """Layer `layer`'s kv indptr rebased to 0 (host int32 [seqs + 1]) and its range
    [start, end) in the step's all-layer indices (absolute offsets, see StepLists)."""
    part = indptr_host[layer * seqs : (layer + 1) * seqs + 1]
    start, end = int(part[0]), int(part[-1])
    return (part - start).to(torch.int32), start, end


def query_order(q_lens: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qo_indptr (host int32 [R*H + 1]) of the sequences (request r, KV head h), each with
    q_lens[r] query rows, and the gather `perm` taking q viewed as [T*H, G, D] (row t*H + h) to
    sequence order (request, head, token); None when that is the identity (one query token per
    request: decode)."""
    q_lens = q_lens.to("cpu", torch.long)
    H = num_kv_heads
    R = q_lens.numel()
    per_seq = q_lens.repeat_interleave(H)
    qo_indptr = torch.zeros(R * H + 1, dtype=torch.int32)
    torch.cumsum(per_seq, 0, out=qo_indptr[1:])
    if bool((q_lens == 1).all()):
        return qo_indptr, None
    T = int(q_lens.sum())
    first = torch.cumsum(q_lens, 0) - q_lens  # each request's first token
    seq_first = first.repeat_interleave(H)  # [R*H]
    head = torch.arange(H).repeat(R)
    within = torch.arange(T * H) - torch.repeat_interleave(qo_indptr[:-1].long(), per_seq, output_size=T * H)
    tok = torch.repeat_interleave(seq_first, per_seq, output_size=T * H) + within
    perm = tok * H + torch.repeat_interleave(head, per_seq, output_size=T * H)
    return qo_indptr, perm


class FlashInferLists:
    """One FlashInfer paged-prefill wrapper per layer over the step's live lists."""

    def __init__(self, num_layers: int, num_q_heads: int, num_kv_heads: int, device,
                 wrapper_cls=None):
        """`wrapper_cls`: FlashInfer's BatchPrefillWithPagedKVCacheWrapper unless given (a test
        on CPU passes a torch implementation of its documented plan/run contract)."""
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
        if wrapper_cls is None:
            import flashinfer

            wrapper_cls = flashinfer.BatchPrefillWithPagedKVCacheWrapper
        self._wrapper_cls = wrapper_cls
        self.num_kv_heads = num_kv_heads
        self.group = num_q_heads // num_kv_heads
        self.device = torch.device(device)
        # One float workspace shared by all layers (they run one after another); each wrapper
        # has its own int workspace and pinned staging buffer.
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self._wrappers: list = [None] * num_layers
        self._planned = [False] * num_layers
        self._step = None

    def begin_step(self, indptr_host: torch.Tensor, indices: torch.Tensor, q_lens: torch.Tensor):
        """A new step: the all-layer host indptr, the device indices, query tokens per request."""
        self._indptr_host = indptr_host
        self._indices = indices
        self._seqs = q_lens.numel() * self.num_kv_heads
        qo_indptr, perm = query_order(q_lens, self.num_kv_heads)
        self._qo_indptr = qo_indptr
        self._perm = None if perm is None else perm.to(self.device, non_blocking=True)
        self._last_page_len = torch.ones(self._seqs, dtype=torch.int32)
        self._planned = [False] * len(self._wrappers)

    def _wrapper(self, layer: int):
        w = self._wrappers[layer]
        if w is None:
            w = self._wrapper_cls(self._workspace, "NHD")
            self._wrappers[layer] = w
        return w

    def run(self, layer: int, q: torch.Tensor, k_slots: torch.Tensor, v_slots: torch.Tensor,
            sm_scale: float) -> torch.Tensor:
        """Attention of q [T, Hq, D] over layer `layer`'s lists of this step -> [T, Hq, Dv]."""
        T, Hq, D = q.shape
        H, G = self.num_kv_heads, self.group
        Dv = v_slots.shape[-1]
        w = self._wrapper(layer)
        if not self._planned[layer]:
            kv_indptr, start, end = layer_plan(self._indptr_host, layer, self._seqs)
            w.plan(
                self._qo_indptr, kv_indptr, self._indices[start:end], self._last_page_len,
                G, 1, D, 1, head_dim_vo=Dv, causal=True, sm_scale=sm_scale,
                q_data_type=q.dtype, kv_data_type=k_slots.dtype,
            )
            self._planned[layer] = True
        rows = q.reshape(T * H, G, D)
        if self._perm is not None:
            rows = rows.index_select(0, self._perm)
        o = w.run(rows, (k_slots.view(-1, 1, 1, D), v_slots.view(-1, 1, 1, Dv)))
        if self._perm is None:
            return o.view(T, Hq, Dv)
        out = torch.empty(T * H, G, Dv, dtype=o.dtype, device=o.device)
        out.index_copy_(0, self._perm, o)
        return out.view(T, Hq, Dv)
