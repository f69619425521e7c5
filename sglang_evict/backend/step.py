"""One forward step's attention metadata, written from the live lists: the per-layer ragged lists
in FlashInfer's layout (sequence r*H + h is request r with KV head h), and the static buffers
CUDA graph replay of decode reads them from."""

from __future__ import annotations

import torch

from sglang_evict.kernels.live_indices import live_indices, live_indices_reference, step_indptr


class StepLists:
    """Per-layer live lists of one forward step: layer l's sequence r*H + h is (request r of
    the batch, KV head h); indices are head-slots in position order. One indptr over all layers
    with absolute offsets into one indices buffer, so a layer's lists are two views (no host
    read; the same addresses every step when the buffers are static, as CUDA graphs need).

    `indptr_host` (the same indptr on the host, from the lists' host mirror) and `q_lens` (host:
    query tokens per request) are kept for kernels planned on the host (FlashInfer)."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, seqs: int,
                 indptr_host: torch.Tensor | None = None, q_lens: torch.Tensor | None = None):
        self._indptr = indptr  # [L * seqs + 1] cumulative over all layers
        self._indices = indices
        self._seqs = seqs
        self.indptr_host = indptr_host
        self.q_lens = q_lens

    @property
    def indices(self) -> torch.Tensor:
        return self._indices

    def layer(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._indptr[l * self._seqs : (l + 1) * self._seqs + 1], self._indices


class GraphBuffers:
    """Static step metadata for CUDA graph replay of decode, sized at capture for `max_bs`
    requests: the step's new head-slots (-1 for a padded request: nothing is stored), the
    all-layer indptr and the indices (at most every head-slot of the pool)."""

    def __init__(self, max_bs: int, num_layers: int, num_kv_heads: int, capacity: int, device):
        self.max_bs = max_bs
        self.new_slots = torch.full((max_bs, num_layers, num_kv_heads), -1, dtype=torch.long,
                                    device=device)
        self.indptr = torch.zeros(num_layers * max_bs * num_kv_heads + 1, dtype=torch.long,
                                  device=device)
        self.indices = torch.full((capacity,), -1, dtype=torch.int32, device=device)


class StepMetadata:
    """Writes a step's StepLists from the live lists of its requests: eagerly into fresh
    buffers, or into the static GraphBuffers for capture and replay."""

    def __init__(self, lists, num_layers: int, num_kv_heads: int, capacity: int, device,
                 use_triton: bool):
        self.lists = lists
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.capacity = capacity
        self.device = device
        # Triton where it compiles for real, its torch twin on CPU.
        self._live_indices = live_indices if use_triton else live_indices_reference
        self.graph: GraphBuffers | None = None  # set when SGLang captures CUDA graphs
        # Also keep each step's indptr on the host (set by a backend that plans there).
        self.host_metadata = False

    def eager(self, rows: torch.Tensor, rows_dev: torch.Tensor, q_lens: torch.Tensor) -> StepLists:
        lists = self.lists
        # The host mirror of the list lengths gives the exact size: no device read.
        total = int(lists.lens_host[rows].sum())
        indptr, indices = self._live_indices(
            lists.arena, lists.row_pages, lists.lens, rows_dev, self.num_layers,
            max_entries=total,
        )
        host = (step_indptr(lists.lens_host, rows, self.num_layers)
                if self.host_metadata else None)
        return StepLists(indptr, indices, rows.numel() * self.num_kv_heads, host, q_lens)

    def init_graph(self, max_bs: int) -> None:
        self.graph = GraphBuffers(max_bs, self.num_layers, self.num_kv_heads, self.capacity,
                                  self.device)

    def capture(self, bs: int) -> tuple[torch.Tensor, StepLists]:
        """An empty step in the static buffers (nothing stored, nothing attended): the new
        head-slots and the lists a graph of `bs` requests is captured with."""
        g = self._graph_for(bs)
        g.new_slots[:bs].fill_(-1)
        g.indptr.zero_()
        return g.new_slots[:bs], StepLists(g.indptr, g.indices, bs * self.num_kv_heads)

    def replay(self, new_slots: torch.Tensor, rows_dev: torch.Tensor,
               bs: int) -> tuple[torch.Tensor, StepLists]:
        """The real requests' step (`new_slots` and `rows_dev` of the first of `bs`) written
        into the static buffers; the padding's new head-slots are -1 and its lists empty."""
        g = self._graph_for(bs)
        raw = rows_dev.numel()
        g.new_slots[:raw].copy_(new_slots)
        g.new_slots[raw:bs].fill_(-1)
        padded = torch.full((bs,), -1, dtype=torch.long, device=self.device)
        padded[:raw] = rows_dev
        lists = self.lists
        self._live_indices(
            lists.arena, lists.row_pages, lists.lens, padded, self.num_layers,
            max_entries=self.capacity, out=(g.indptr, g.indices),
        )
        return g.new_slots[:bs], StepLists(g.indptr, g.indices, bs * self.num_kv_heads)

    def _graph_for(self, bs: int) -> GraphBuffers:
        if self.graph is None or bs > self.graph.max_bs:
            raise RuntimeError(
                f"sglang-evict: a decode graph of {bs} requests needs init_graph(max_bs >= {bs})"
            )
        return self.graph


def host_field(batch, name: str) -> torch.Tensor:
    """A batch field as a host int64 tensor, from SGLang's CPU copy when it has one."""
    cpu = getattr(batch, name + "_cpu", None)
    if cpu is None:
        cpu = getattr(batch, name)
    if isinstance(cpu, torch.Tensor):
        return cpu.to("cpu", torch.long)
    return torch.tensor(cpu, dtype=torch.long)
