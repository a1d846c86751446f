"""ModelRunner: owns the weights, the KV page pool and the attention backend, and runs forwards.

The worker decides (which requests, which pages, which tokens); the runner computes. A step
goes `StepBatch.build(...)` -> `run(step)` -> logits of the rows to sample, with the prompt
log-probs of requests that asked for them recorded on the way. `forward(batch)` is the bare
compute on a `ForwardBatch` of plain tensors: all a tensor-parallel rank other than 0 needs
(runner/tensor_parallel.py; given a `TensorParallel`, the runner holds its rank's slice of the
weights and a KV pool for its heads).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from radixrt import _native
from radixrt.attention import make_attention_backend
from radixrt.attention.base import ForwardBatch
from radixrt.attention.native import NativeAttention
from radixrt.cache.page_pool import KVPool
from radixrt.config import EngineConfig
from radixrt.model.fused import FusedDecoder, unsupported
from radixrt.model.gguf_quant import load_gguf_linears
from radixrt.model.llama import LlamaForCausalLM
from radixrt.model.loader import default_gguf_path, iter_weights, read_model_config
from radixrt.model.parallel import TensorParallel
from radixrt.model.quant import BATCH_INVARIANT, QuantLinear, quantize_linears
from radixrt.runner.dtype import resolve_dtype
from radixrt.runner.step_batch import PromptRows, StepBatch
from radixrt.sampling import prompt_logprobs, select_rows

log = logging.getLogger(__name__)


def load_model(
    model_dir: str | os.PathLike,
    dtype: torch.dtype,
    device: str = "cpu",
    tp: TensorParallel | None = None,
    quantization: str | None = None,
    gguf_path: str | os.PathLike | None = None,
) -> LlamaForCausalLM:
    """Build our model for the checkpoint folder (this rank's slice of it) and copy its weights in;
    then swap its linear layers for quantized ones if asked (`gguf`: the integers of `gguf_path`)."""
    model_config = read_model_config(model_dir)
    with torch.device(device):
        model = LlamaForCausalLM(model_config, tp)
    model.load_weights(iter_weights(model_dir, dtype, device))
    model.to(dtype)
    model.rotary.float()  # rotary tables stay float32: bf16 angles lose precision at long positions
    if quantization == "gguf":
        load_gguf_linears(model, gguf_path)
    elif quantization:
        quantize_linears(model, quantization)
    return model.eval()


def resolve_quantization(config: EngineConfig, gguf: Path | None, tp: TensorParallel | None) -> str | None:
    """What `--quantization` means for this model here: None (float weights), int8, int4 or gguf."""
    if config.quantization == "gguf" and gguf is None:
        raise ValueError("--quantization gguf runs a .gguf file's own quantized weights: --model is not one")
    if config.quantization != "auto":
        return None if config.quantization == "none" else config.quantization
    native = config.device == "cpu" and _native.load() is not None
    return "gguf" if gguf is not None and native and tp is None else None


def _make_batch_invariant(model: LlamaForCausalLM) -> None:
    """Every quantized layer through the native kernel at any number of rows (it computes each row alone);
    float weights go through torch's GEMM, whose rounding depends on the rows, so they are refused."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    float_layers = any(isinstance(m, torch.nn.Linear) for m in model.modules())
    if not layers or float_layers or any(m.backend != "native" for m in layers):
        raise ValueError(
            "--enable-deterministic-inference needs quantized weights on the native CPU kernels (the default "
            "--quantization auto with a .gguf model, or gguf/int8/int4): torch's GEMM rounds a row by its batch"
        )
    for layer in layers:
        layer.dequantize_min_rows = BATCH_INVARIANT


def gguf_source(model: str | None) -> Path | None:
    """The .gguf file a model option names (None: the default model's), or None for a checkpoint folder."""
    if model is None:
        return default_gguf_path()
    return Path(model) if str(model).endswith(".gguf") else None


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_dir: str | os.PathLike,
        tp: TensorParallel | None = None,
        num_pages: int | None = None,
    ) -> None:
        """`num_pages`: the pool's size, instead of what config's budget holds (a draft model's pool
        mirrors the target's page ids: worker/draft_model.py)."""
        self.device = config.device
        self.page_size = config.page_size
        gguf = gguf_source(config.model)
        self.quantization = resolve_quantization(config, gguf, tp)
        self.dtype = resolve_dtype(config.dtype, model_dir, gguf is not None, config.device)
        self.model = load_model(model_dir, self.dtype, config.device, tp, self.quantization, gguf)
        if config.enable_deterministic_inference:
            _make_batch_invariant(self.model)
        self.model_config = self.model.config
        kv_layout = self.model.shard  # this rank's KV heads (all of them without tensor parallelism)
        pages = KVPool.pages_for_budget(kv_layout, int(config.kv_memory_gb * 2**30), config.page_size, self.dtype)
        if num_pages is not None:
            pages = num_pages
        elif config.max_total_tokens is not None:
            pages = min(pages, config.max_total_tokens // config.page_size)
        self.pool = KVPool(kv_layout, pages, config.page_size, self.dtype, config.device)
        self.backend = make_attention_backend(config.attention_backend, config.device)
        self.fused = None if config.disable_fused_decoder else _fused_decoder(self.model, self.pool, self.backend)

    def build(self, reqs, num_new, drafts=None) -> StepBatch:
        return StepBatch.build(reqs, num_new, self.page_size, self.device, drafts)

    def forward(self, batch: ForwardBatch) -> torch.Tensor | None:
        """float32 logits of the rows in batch.logits_indices (None on tensor-parallel ranks > 0);
        K/V of every new token land in the pool."""
        if self.fused is not None:
            return self.fused.forward(batch)
        return self.model(batch, self.pool, self.backend)

    def run(self, step: StepBatch) -> torch.Tensor:
        """Forward the step; record prompt log-probs; return the logits rows to sample, in sample_rows order
        (`count` rows for a sample row that verifies drafts)."""
        logits = self.forward(step.forward)
        for rows in step.prompt_rows:
            _record_prompt_logprobs(rows, logits)
        return select_rows(logits, [r for s in step.sample_rows for r in range(s.row, s.row + s.count)])

    def close(self) -> None:
        """Release what outlives the runner's memory: nothing here (a tensor-parallel group: its ranks)."""


def _fused_decoder(model, pool: KVPool, backend) -> FusedDecoder | None:
    """The one-call-per-step CPU forward where it covers the model (model/fused.py), else None."""
    if not isinstance(backend, NativeAttention):
        return None
    reason = unsupported(model)
    if reason:
        log.info("eager forward: the fused decoder does not cover %s", reason)
        return None
    return FusedDecoder(model, pool, backend.ops)


def _record_prompt_logprobs(rows: PromptRows, logits: torch.Tensor) -> None:
    """Row at position p predicts token p + 1: that is prompt token p + 1's log-prob.

    The lists stay aligned with the prompt: tokens whose predicting position was not
    computed here (token 0, a cached prefix before `logprob_start_len`) get None.
    """
    req = rows.req
    missing = rows.first_position + 1 - len(req.prompt_logprobs)
    req.prompt_logprobs.extend([None] * missing)
    req.prompt_top_logprobs.extend([] for _ in range(missing))
    start = len(req.prompt_logprobs)  # the first prompt token still without a log-prob
    last = min(rows.first_position + rows.count, len(req.prompt_ids) - 1)  # predictions inside the prompt
    n = last - start + 1
    if n <= 0:
        return
    first_row = rows.first_row + start - 1 - rows.first_position
    targets = torch.tensor(req.prompt_ids[start : last + 1], device=logits.device)
    chosen, top_ids, top_vals = prompt_logprobs(logits[first_row : first_row + n], targets, req.params.top_logprobs)
    req.prompt_logprobs.extend(chosen.tolist())
    req.prompt_top_logprobs.extend(list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_vals.tolist()))
