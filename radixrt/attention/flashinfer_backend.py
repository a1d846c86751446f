"""The flashinfer backend (NVIDIA GPUs): flashinfer's paged decode and prefill kernels.

Our KV pool already has flashinfer's "NHD" page layout ([num_pages, page_size, kv_heads,
head_dim] per layer, K and V apart), so the pages are handed over as they are; only the page
tables are converted, once per step, into flashinfer's CSR form (`native.paged_index`)::

    kv_indptr [B + 1], kv_indices [pages], kv_last_page_len [B] (keys in the last page, 1..page_size)

A decode-only step plans `BatchDecodeWithPagedKVCacheWrapper` (with tensor cores from a GQA
group of 4 up, as SGLang does); any step with a prefill chunk plans one
`BatchPrefillWithPagedKVCacheWrapper` over all its requests with `causal=True`: flashinfer aligns
the causal mask to the end of each request's keys, which is exactly our "offset by the cached
prefix". Planning needs the query head count, which only the first layer's call brings, so it
happens there and every later layer of the step reuses the plan. flashinfer has no float32
kernels: a float32 pool runs on the torch reference instead (logged once).

A layer's `LayerAttention` goes into the plan: `sm_scale`, `window_left` (flashinfer's left window,
inclusive: a sliding window of W keys is W - 1) and `logits_soft_cap` (flashinfer applies
cap * tanh(sm_scale * q.k / cap), as Gemma 2 does). So a model whose layers differ (Gemma: sliding
and full layers) plans one wrapper per distinct LayerAttention per step, as SGLang does. Written from
flashinfer's documented plan() arguments; not yet run on a GPU.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch

from radixrt.attention.base import AttentionBackend, ForwardBatch, LayerAttention, write_kv
from radixrt.attention.native import PagedIndex, paged_index
from radixrt.attention.torch_ref import TorchAttention
from radixrt.cache.page_pool import KVPool

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 128 * 2**20  # flashinfer's suggested float workspace for split-KV partials
TENSOR_CORE_MIN_GROUP = 4  # query heads per KV head from which the prefill-style decode kernel wins


def import_flashinfer() -> ModuleType:
    """flashinfer >= 0.2 (the plan/run API), or an ImportError that says how to get it."""
    try:
        import flashinfer
    except ImportError as exc:
        raise ImportError("flashinfer is not installed (pip install 'radixrt[gpu]', i.e. flashinfer-python)") from exc
    for wrapper in ("BatchDecodeWithPagedKVCacheWrapper", "BatchPrefillWithPagedKVCacheWrapper"):
        if not hasattr(getattr(flashinfer, wrapper, None), "plan"):
            raise ImportError(f"flashinfer {getattr(flashinfer, '__version__', '?')} is too old: radixrt needs >= 0.2")
    return flashinfer


class FlashInferAttention(AttentionBackend):
    name = "flashinfer"

    def __init__(self, flashinfer: ModuleType | None = None) -> None:
        self.fi = flashinfer or import_flashinfer()
        self._workspace: torch.Tensor | None = None
        self._decode: dict[tuple[bool, LayerAttention], object] = {}  # (use_tensor_cores, params) -> wrapper
        self._prefill: dict[LayerAttention, object] = {}
        self._fallback = TorchAttention()
        self._warned = False

    def prepare(self, batch: ForwardBatch, pool: KVPool) -> None:
        state = batch.backend_state
        state["flashinfer"] = pool.dtype in (torch.float16, torch.bfloat16)
        if not state["flashinfer"]:
            if not self._warned:
                log.warning("flashinfer has no %s kernels; using the torch attention backend for this pool", pool.dtype)
                self._warned = True
            self._fallback.prepare(batch, pool)
            return
        state["index"] = paged_index(batch, pool.k[0].device)
        state["plans"] = {}  # LayerAttention -> the wrapper planned for it this step

    def forward(self, layer, q, k, v, batch, pool, params: LayerAttention | None = None):
        params = params or LayerAttention.plain(q.shape[-1])
        state = batch.backend_state
        if not state["flashinfer"]:
            return self._fallback.forward(layer, q, k, v, batch, pool, params)
        write_kv(pool, layer, k, v, batch.out_slots)
        wrapper = state["plans"].get(params) or self._plan(batch, pool, q.shape[1], params)
        out = wrapper.run(q.to(pool.dtype).contiguous(), (pool.k[layer], pool.v[layer]))
        return out.to(q.dtype)

    def _plan(self, batch: ForwardBatch, pool: KVPool, num_heads: int, params: LayerAttention):
        state = batch.backend_state
        idx: PagedIndex = state["index"]
        _, page_size, kv_heads, head_dim = pool.k[0].shape
        options = dict(
            sm_scale=params.scale, window_left=params.window_left, logits_soft_cap=params.logit_softcap,
            q_data_type=pool.dtype, kv_data_type=pool.dtype,
        )  # fmt: skip
        if batch.is_decode_only:
            wrapper = self._decode_wrapper(num_heads // kv_heads >= TENSOR_CORE_MIN_GROUP, params, pool.k[0].device)
            wrapper.plan(
                idx.kv_indptr, idx.kv_indices, idx.last_page_len, num_heads, kv_heads, head_dim, page_size,
                pos_encoding_mode="NONE", **options,
            )  # fmt: skip
        else:
            wrapper = self._prefill_wrapper(params, pool.k[0].device)
            wrapper.plan(
                idx.qo_indptr, idx.kv_indptr, idx.kv_indices, idx.last_page_len, num_heads, kv_heads, head_dim,
                page_size, causal=True, **options,
            )  # fmt: skip
        state["plans"][params] = wrapper
        return wrapper

    def _workspace_on(self, device: torch.device) -> torch.Tensor:
        if self._workspace is None or self._workspace.device != device:
            self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self._workspace

    def _decode_wrapper(self, use_tensor_cores: bool, params: LayerAttention, device: torch.device):
        key = (use_tensor_cores, params)
        if key not in self._decode:
            self._decode[key] = self.fi.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace_on(device), "NHD", use_tensor_cores=use_tensor_cores
            )
        return self._decode[key]

    def _prefill_wrapper(self, params: LayerAttention, device: torch.device):
        if params not in self._prefill:
            self._prefill[params] = self.fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace_on(device), "NHD")
        return self._prefill[params]
