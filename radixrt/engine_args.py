"""The engine's command-line flags, shared by `radixrt generate | chat | serve`: each maps onto an
`EngineConfig` field, with the choices and defaults that config declares."""

from __future__ import annotations

import argparse
import dataclasses

from radixrt.config import ATTENTION_BACKENDS, GRAMMAR_BACKENDS, POLICIES, QUANTIZATIONS, EngineConfig
from radixrt.frontend.chat_template import BUILTIN_TEMPLATES
from radixrt.runner.dtype import DTYPE_CHOICES

DTYPE_ALIASES = {"float": "float32"}  # SGLang's and vLLM's spelling


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model; each maps onto an EngineConfig field."""
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    _add_speculative_args(parser.add_argument_group("speculative decoding (docs/speculative.md)"), d)
    g.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=None,
        help="HF checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--dtype",
        default=d.dtype,
        type=lambda name: DTYPE_ALIASES.get(name, name),
        choices=DTYPE_CHOICES,
        help="weights, activations and KV; auto: bfloat16 where the CPU has AVX512_BF16/AMX or on CUDA, "
        "float32 for float32 checkpoints and elsewhere; SGLang's 'float' means float32 (default: %(default)s)",
    )
    g.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda (default: %(default)s)")
    g.add_argument("--page-size", type=int, default=d.page_size, help="tokens per KV page (default: %(default)s)")
    g.add_argument(
        "--kv-memory-gb",
        type=float,
        default=d.kv_memory_gb,
        help="KV page pool budget in GiB; --mem-fraction-static replaces it (default: %(default)s)",
    )
    g.add_argument(
        "--mem-fraction-static",
        type=float,
        default=None,
        help="SGLang's sizing: this fraction of the memory free at start (available RAM on a CPU, free GPU "
        "memory on CUDA) holds the weights plus the KV pool, which gets what the weights leave; it replaces "
        "--kv-memory-gb, and --max-total-tokens still caps it (default: unset, --kv-memory-gb decides)",
    )
    g.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="cap the KV pool at this many tokens (default: --kv-memory-gb decides)",
    )
    g.add_argument(
        "--max-running-requests", type=int, default=d.max_running_requests, help="max batch size (default: %(default)s)"
    )
    g.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=d.chunked_prefill_size,
        help="prefill tokens per step (default: %(default)s)",
    )
    g.add_argument(
        "--max-context-len",
        "--context-length",
        "--max-model-len",
        dest="max_context_len",
        type=int,
        default=None,
        help="cap on prompt + output tokens (default: the model's)",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        help=f"a Jinja chat template file, or a built-in name ({', '.join(BUILTIN_TEMPLATES)}), instead of "
        "the model's own (default: the model's)",
    )
    g.add_argument(
        "--schedule-policy",
        default=d.schedule_policy,
        choices=list(POLICIES),
        help="waiting-queue order (default: %(default)s)",
    )
    g.add_argument("--disable-radix-cache", action="store_true", help="turn the prefix cache off (for comparison)")
    g.add_argument(
        "--kv-disk-dir",
        default=None,
        help="keep KV pages in a disk tier in this folder, beyond memory and across restarts (docs/kv_tiers.md)",
    )
    g.add_argument("--kv-disk-gb", type=float, default=d.kv_disk_gb, help="disk tier size cap (default: %(default)s)")
    g.add_argument(
        "--enable-hierarchical-cache",
        action="store_true",
        help="SGLang's flag: a disk tier in --kv-disk-dir, or in ~/.cache/radixrt/kv when none is given",
    )
    g.add_argument(
        "--max-pinned-tokens",
        type=int,
        default=None,
        help="cap on the tokens pinned prefixes hold in memory (default: a fifth of the KV pool)",
    )
    g.add_argument(
        "--starvation-timeout-s",
        type=float,
        default=d.starvation_timeout_s,
        help="age after which a waiting request goes first (default: %(default)s)",
    )
    g.add_argument(
        "--attention-backend", default=d.attention_backend, choices=ATTENTION_BACKENDS, help="default: %(default)s"
    )
    g.add_argument(
        "--quantization",
        default=d.quantization,
        choices=QUANTIZATIONS,
        help="weight-only quantized linear layers on the CPU: int8 (per channel) or int4 (groups of 32) "
        "requantize the weights; gguf runs a .gguf model's own quantized tensors; none keeps the dtype's "
        "weights; auto: gguf for a .gguf model (the default model is one) when the native kernels build, "
        "else none (default: %(default)s)",
    )
    g.add_argument(
        "--enable-deterministic-inference",
        action="store_true",
        help="the same output for a request whatever else is batched with it: quantized layers compute each "
        "row alone at every chunk size (prefill ~10-15%% slower); needs quantized weights (the default)",
    )
    g.add_argument(
        "--disable-fused-decoder",
        action="store_true",
        help="run the model op by op from Python instead of the fused CPU decoder (csrc/decoder.cpp; for comparison)",
    )
    g.add_argument(
        "--grammar-backend",
        default=d.grammar_backend,
        choices=list(GRAMMAR_BACKENDS),
        help="constrained decoding engine (default: %(default)s)",
    )
    g.add_argument(
        "--grammar-compile-timeout-s",
        type=float,
        default=d.grammar_compile_timeout_s,
        help="a grammar still compiling after this many seconds fails its request with 408 (default: %(default)s)",
    )
    g.add_argument(
        "--disable-jump-forward",
        dest="enable_jump_forward",
        action="store_false",
        help="decode grammar-forced text token by token (default: append it and compute it in one step)",
    )
    g.add_argument("--num-threads", type=int, default=None, help="torch threads in the worker (default: torch's)")
    g.add_argument(
        "--tp",
        "--tp-size",
        "--tensor-parallel-size",
        dest="tp_size",
        type=int,
        default=d.tp_size,
        help="tensor-parallel ranks, one process each; --num-threads is split between them (default: %(default)s)",
    )
    g.add_argument(
        "--seed", "--random-seed", dest="seed", type=int, default=d.seed, help="random seed (default: %(default)s)"
    )


def _add_speculative_args(g, d: EngineConfig) -> None:
    """SGLang's flags for n-gram and draft-model speculation, plus ours (--speculative-ngram-from-cache)."""
    g.add_argument(
        "--speculative-algorithm",
        default=None,
        help="NGRAM: draft by prompt lookup in the request's tokens; STANDALONE (or DRAFT): draft with "
        "--speculative-draft-model-path. EAGLE is not supported (default: off)",
    )
    g.add_argument(
        "--speculative-num-draft-tokens",
        type=int,
        default=d.speculative_num_draft_tokens,
        help="the most draft tokens a request verifies per step; each request's own count adapts to its "
        "acceptance rate (default: %(default)s)",
    )
    for bound in ("min", "max"):
        name = f"speculative_ngram_{bound}_match_window_size"
        g.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(d, name),
            help=f"the {bound} n of the n-grams NGRAM matches (default: %(default)s)",
        )
    g.add_argument(
        "--speculative-ngram-from-cache",
        action="store_true",
        help="NGRAM: when a request's own tokens give no draft, look its last tokens up in every sequence "
        "the radix cache holds under its cache_salt",
    )
    g.add_argument(
        "--speculative-ngram-disable-text-lookup",
        dest="speculative_ngram_text_lookup",
        action="store_false",
        help="NGRAM: match only token n-grams, not also the prompt's text by characters (which finds copies "
        "tokenized differently, e.g. a word that opens a JSON string)",
    )
    g.add_argument(
        "--speculative-draft-model-path",
        "--speculative-draft-model",
        dest="speculative_draft_model_path",
        default=None,
        help="STANDALONE: a smaller model with the target's tokenizer (checkpoint folder or .gguf)",
    )
    g.add_argument(
        "--speculative-draft-model-quantization",
        default=None,
        help="the draft model's --quantization (default: the target's)",
    )
    g.add_argument(
        "--speculative-max-batch-size",
        type=int,
        default=d.speculative_max_batch_size,
        help="no drafts in a step with more decode requests than this: the step is compute-bound "
        "(default: %(default)s, measured on a 2-core CPU)",
    )
    g.add_argument(
        "--speculative-disable-adaptive",
        dest="speculative_adaptive",
        action="store_false",
        help="draft --speculative-num-draft-tokens every step instead of adapting to each request's "
        "acceptance rate (for measurements)",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    return EngineConfig(**{k: v for k, v in vars(args).items() if k in names})


def check_engine_config(config: EngineConfig) -> None:
    """Raise ValueError for what the flags name but cannot be used: a --chat-template that is no
    template, a --mem-fraction-static that leaves the KV pool nothing (kv_budget.py)."""
    from radixrt.frontend.chat_template import load_chat_template
    from radixrt.kv_budget import resolve_kv_budget
    from radixrt.model.loader import resolve_model_path

    if config.chat_template:
        load_chat_template(config.chat_template)
    if config.mem_fraction_static is not None:
        resolve_kv_budget(config, resolve_model_path(config.model))
