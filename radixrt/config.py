"""EngineConfig: every knob of the runtime in one validated dataclass (CLI flags map onto it)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from radixrt.attention import BACKENDS as ATTENTION_BACKENDS
from radixrt.constrained import BACKENDS as GRAMMAR_BACKENDS
from radixrt.constrained import DEFAULT_BACKEND as DEFAULT_GRAMMAR_BACKEND
from radixrt.runner.dtype import DTYPE_CHOICES
from radixrt.scheduler.policy import POLICIES

QUANTIZATIONS = ("auto", "none", "int8", "int4", "gguf")

# keyword -> field, as the CLI flags spell them: SGLang's and vLLM's names for what we support.
ALIASES = {
    "tp": "tp_size",
    "tensor_parallel_size": "tp_size",
    "model_path": "model",
    "context_length": "max_context_len",
    "max_model_len": "max_context_len",
    "random_seed": "seed",
}

# SGLang's names -> ours; EAGLE and its relatives (NEXTN, MTP) need trained draft heads we do not have.
SPECULATIVE_ALGORITHMS = {"NGRAM": "NGRAM", "STANDALONE": "DRAFT", "DRAFT": "DRAFT"}


@dataclass
class EngineConfig:
    model: str | None = None  # None: the default SmolLM2-135M-Instruct GGUF
    dtype: str = "auto"  # weights, activations and KV; auto: bf16 where the device has it (runner/dtype.py)
    device: str = "cpu"
    page_size: int = 16
    kv_memory_gb: float = 1.0  # K+V page pool budget
    # SGLang's sizing instead: this fraction of the memory free before loading holds the weights and
    # the KV pool (kv_budget.py: available RAM on a CPU, free GPU memory on CUDA); overrides kv_memory_gb.
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None  # cap the pool at this many tokens (SGLang's name); None: kv_memory_gb decides
    max_running_requests: int = 64
    chunked_prefill_size: int = 512  # prefill tokens per step (decode tokens ride along)
    max_context_len: int | None = None  # default: the model's max_position_embeddings
    chat_template: str | None = None  # a Jinja file or a built-in name (frontend/chat_template.py); None: the model's
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    starvation_timeout_s: float = 10.0  # a waiting request older than this jumps the policy order
    kv_disk_dir: str | None = None  # a disk tier for KV pages under this folder (docs/kv_tiers.md); None: memory only
    kv_disk_gb: float = 16.0  # the disk tier's size cap
    enable_hierarchical_cache: bool = False  # SGLang's spelling: a disk tier in kv_disk_dir or ~/.cache/radixrt/kv
    max_pinned_tokens: int | None = None  # cap on pinned prefixes; None: a fifth of the KV pool (cache/pins.py)
    attention_backend: str = "auto"
    # SGLang's name: a row's logits never depend on the rest of its batch (quantized layers run the native
    # kernel at every chunk size, ~10-15% slower prefill; docs/kernels.md); needs quantized weights
    enable_deterministic_inference: bool = False
    disable_fused_decoder: bool = False  # True: the eager per-op forward even where the fused CPU one covers the model
    grammar_backend: str = DEFAULT_GRAMMAR_BACKEND  # chosen by measured schema coverage: docs/constrained.md
    grammar_compile_timeout_s: float = 10.0  # a grammar still compiling after this fails its request (408)
    enable_jump_forward: bool = True  # append grammar-forced text in one chunk (see docs/constrained.md)
    num_threads: int | None = None  # torch intra-op threads in the worker; None: torch's default
    # Weight-only quantization (model/quant.py): int8 / int4 requantize the float weights; gguf keeps a
    # .gguf model's own quantized tensors (model/gguf_quant.py); none: the dtype's weights. auto: gguf
    # for a .gguf model on the CPU with the native kernels (what llama.cpp computes with), else none.
    quantization: str = "auto"
    tp_size: int = 1  # tensor-parallel ranks, one process each, threads split between them (docs/scaling.md)
    seed: int = 0
    # Speculative decoding (docs/speculative.md): NGRAM drafts by prompt lookup in the request's own tokens
    # (and with speculative_ngram_from_cache in the radix cache's); DRAFT (SGLang: STANDALONE) from a smaller
    # model with the same tokenizer. Each request's draft length adapts to its acceptance (worker/draft_length.py).
    speculative_algorithm: str | None = None
    speculative_num_draft_tokens: int = 8  # the most draft tokens one request verifies per step
    speculative_ngram_min_match_window_size: int = 1  # SGLang's names and defaults: n of the n-grams matched
    speculative_ngram_max_match_window_size: int = 12
    speculative_ngram_from_cache: bool = False
    speculative_ngram_text_lookup: bool = True  # ours: when token n-grams miss, match the prompt's text by characters
    speculative_draft_model_path: str | None = None
    speculative_draft_model_quantization: str | None = None  # None: as --quantization
    speculative_max_batch_size: int = 16  # a step with more decode requests is compute-bound: no drafts
    speculative_adaptive: bool = True  # False: always the most draft tokens (for measurements and tests)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)} (got {self.dtype!r})")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1 (got {self.page_size})")
        if self.grammar_compile_timeout_s <= 0:
            raise ValueError(f"grammar_compile_timeout_s must be > 0 (got {self.grammar_compile_timeout_s})")
        if self.kv_memory_gb <= 0:
            raise ValueError(f"kv_memory_gb must be > 0 (got {self.kv_memory_gb})")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1] (got {self.mem_fraction_static})")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError(f"max_total_tokens must be >= page_size (got {self.max_total_tokens})")
        if self.kv_disk_gb <= 0:
            raise ValueError(f"kv_disk_gb must be > 0 (got {self.kv_disk_gb})")
        if (self.kv_disk_dir or self.enable_hierarchical_cache) and self.disable_radix_cache:
            raise ValueError("the KV disk tier needs the radix cache: drop disable_radix_cache")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1 (got {self.max_running_requests})")
        if self.chunked_prefill_size < self.page_size:
            raise ValueError(f"chunked_prefill_size must be >= page_size (got {self.chunked_prefill_size})")
        if self.tp_size < 1:
            raise ValueError(f"tp_size must be >= 1 (got {self.tp_size})")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (got {self.quantization!r})")
        if self.quantization in ("int8", "int4", "gguf") and (self.tp_size > 1 or self.device != "cpu"):
            raise ValueError("quantized weights run on the CPU without tensor parallelism (for now)")
        if self.tp_size > 1 and (self.kv_disk_dir or self.enable_hierarchical_cache):
            raise ValueError("the KV disk tier does not work with tp_size > 1 yet (each rank holds part of every page)")
        for name, value, choices in (
            ("schedule_policy", self.schedule_policy, POLICIES),
            ("attention_backend", self.attention_backend, ATTENTION_BACKENDS),
            ("grammar_backend", self.grammar_backend, GRAMMAR_BACKENDS),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
        self._check_speculative()

    def _check_speculative(self) -> None:
        """Normalize SGLang's algorithm names (NGRAM, STANDALONE) and check the speculative options."""
        algorithm = self.speculative_algorithm
        if algorithm is not None:
            algorithm = self.speculative_algorithm = SPECULATIVE_ALGORITHMS.get(algorithm.upper(), algorithm.upper())
            if algorithm.startswith("EAGLE") or algorithm in ("NEXTN", "MTP"):
                raise ValueError(f"speculative_algorithm {algorithm} is not supported: use NGRAM or STANDALONE")
            if algorithm not in SPECULATIVE_ALGORITHMS.values():
                raise ValueError(f"speculative_algorithm must be NGRAM, STANDALONE or DRAFT (got {algorithm!r})")
        if (algorithm == "DRAFT") != (self.speculative_draft_model_path is not None):
            raise ValueError("a draft model (speculative_draft_model_path) goes with speculative_algorithm STANDALONE")
        if algorithm == "DRAFT" and self.tp_size > 1:
            raise ValueError("a draft model does not work with tp_size > 1 yet")
        if self.speculative_num_draft_tokens < 1 or self.speculative_max_batch_size < 1:
            raise ValueError("speculative_num_draft_tokens and speculative_max_batch_size must be >= 1")
        if not 1 <= self.speculative_ngram_min_match_window_size <= self.speculative_ngram_max_match_window_size:
            raise ValueError("the n-gram match windows must satisfy 1 <= min <= max")
        if self.speculative_draft_model_quantization not in (None, *QUANTIZATIONS):
            names = ", ".join(map(str, QUANTIZATIONS))
            raise ValueError(f"speculative_draft_model_quantization must be None or one of {names}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Build from keyword arguments, naming any unknown one; SGLang's and vLLM's names (ALIASES) work too."""
        fields: dict = {}
        for key, value in kwargs.items():
            name = ALIASES.get(key, key)
            if value is None and name in fields:
                continue  # Engine(model=None, model_path="...")
            if fields.get(name) is not None and fields[name] != value:
                raise ValueError(f"engine option {name} given twice with different values (as {key} too)")
            fields[name] = value
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            known = names | set(ALIASES)
            hints = [f"{u} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(u, known, 1)) else u
                     for u in unknown]  # fmt: skip
            raise ValueError(f"unknown engine option(s): {', '.join(hints)}; known: {', '.join(sorted(names))}")
        return cls(**fields)
