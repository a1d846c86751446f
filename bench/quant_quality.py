"""What quantization costs the default model: perplexity and greedy agreement, bf16 vs int8 vs int4.

    nice -n 5 python bench/quant_quality.py            # ~3-5 min on 2 cores

Variants, all but the first computing in bf16 (the default model is a Q4_1 GGUF; "bf16" is its
dequantized weights rounded to bf16, today's path):
    float32       the float model in fp32: how far bf16 arithmetic alone moves the numbers
    bf16          the float model in bf16, the reference for agreement
    int8          every linear requantized from the bf16 weights, int8 per channel
    int4          requantized from the bf16 weights, int4 groups of 32 (fp16 scale + offset); the LM
                  head int8 (quantize_linears' default)
    int4-head4    the same with the LM head int4 too
    gguf          the GGUF's own integers (Q4_1 linears, Q8_0 embedding = tied LM head), no requantizing
The tied LM head is quantized too and the embedding reads its rows from it.

1. Perplexity on held-out English shipped with Python (pydoc_data/topics.py, the `help()` topics, in
   key order): the first 8,192 tokens in 16 windows of 512, each scored from its own start.
2. Greedy agreement: 32 short chat prompts, 32 greedy tokens each (past the end of turn too), batched;
   per variant how many prompts' 32 tokens equal the reference's, and how many equal its answer (up
   to its end of turn), against bf16 and against fp32.

Table to stdout, JSON to bench/results/quant_quality.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save, table  # noqa: E402

from radixrt.attention import make_attention_backend  # noqa: E402
from radixrt.attention.base import ForwardBatch  # noqa: E402
from radixrt.cache.page_pool import KVPool  # noqa: E402
from radixrt.model.gguf_quant import load_gguf_linears  # noqa: E402
from radixrt.model.llama import LlamaForCausalLM  # noqa: E402
from radixrt.model.loader import (  # noqa: E402
    default_gguf_path,
    iter_weights,
    load_tokenizer,
    read_model_config,
    resolve_model_path,
)
from radixrt.model.quant import quantize_linears  # noqa: E402

PAGE = 16
WINDOW, TOKENS = 512, 8192
NEW_TOKENS = 32
PROMPTS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "What is 12 times 12?", "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?", "Give me a synonym for happy.",
    "What planet is known as the Red Planet?", "Explain what a noun is in one sentence.",
    "What is the largest ocean on Earth?", "How many days are in a leap year?",
    "What gas do plants absorb from the air?", "Write a haiku about the sea.", "What is the square root of 81?",
    "Name a mammal that can fly.", "What language is spoken in Brazil?", "What is the freezing point of water?",
    "List two uses of a paperclip.", "Who painted the Mona Lisa?", "What is the opposite of cold?",
    "How many continents are there?", "What is photosynthesis?", "Suggest a name for a pet cat.",
    "What does a thermometer measure?", "What is the chemical symbol for gold?",
    "Why is the sky blue? Answer briefly.", "What is the tallest animal?", "Count from one to five.",
    "What is the main ingredient of bread?", "Describe a rainbow in one sentence.",
    "What do bees make?",
]  # fmt: skip


def build(folder: Path, variant: str) -> LlamaForCausalLM:
    dtype = torch.float32 if variant == "float32" else torch.bfloat16
    model = LlamaForCausalLM(read_model_config(folder))
    model.load_weights(iter_weights(folder, dtype))
    model.to(dtype)
    model.rotary.float()
    if variant in ("int8", "int4"):
        quantize_linears(model, variant)
    elif variant == "int4-head4":
        quantize_linears(model, "int4", lm_head="int4")
    elif variant == "gguf":
        load_gguf_linears(model, default_gguf_path())
    return model.eval()


def step(model, backend, pool, seqs: list[list[int]], new: list[int], tables: list[list[int]]) -> torch.Tensor:
    """One forward over the last `new[b]` tokens of each sequence (the rest cached); last-token logits."""
    ids, positions, slots, indptr = [], [], [], [0]
    for seq, n, pages in zip(seqs, new, tables):
        for i in range(len(seq) - n, len(seq)):
            ids.append(seq[i])
            positions.append(i)
            slots.append(pages[i // PAGE] * PAGE + i % PAGE)
        indptr.append(indptr[-1] + n)
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.tensor(positions),
        out_slots=torch.tensor(slots),
        qo_indptr=indptr,
        prefix_lens=[len(s) - n for s, n in zip(seqs, new)],
        seq_lens=[len(s) for s in seqs],
        page_tables=tables,
        logits_indices=torch.tensor(indptr[1:]) - 1,
        page_size=PAGE,
    )
    return model(batch, pool, backend)


def window_nll(model, backend, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given their prefixes, and the count."""
    pool = KVPool(model.config, num_pages=len(ids) // PAGE + 1, page_size=PAGE, dtype=model.norm.weight.dtype)
    table = list(range(pool.num_pages))
    batch = ForwardBatch(
        input_ids=torch.tensor(ids),
        positions=torch.arange(len(ids)),
        out_slots=torch.arange(len(ids)),
        qo_indptr=[0, len(ids)],
        prefix_lens=[0],
        seq_lens=[len(ids)],
        page_tables=[table],
        logits_indices=torch.arange(len(ids) - 1),
        page_size=PAGE,
    )
    logits = model(batch, pool, backend)
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
    return nll.item(), len(ids) - 1


def perplexity(model, backend, tokens: list[int]) -> float:
    total, count = 0.0, 0
    for start in range(0, TOKENS, WINDOW):
        nll, n = window_nll(model, backend, tokens[start : start + WINDOW])
        total, count = total + nll, count + n
    return float(torch.exp(torch.tensor(total / count)))


def greedy(model, backend, prompts: list[list[int]]) -> list[list[int]]:
    """NEW_TOKENS greedy tokens for every prompt, all prompts batched in every step."""
    pages_each = (max(map(len, prompts)) + NEW_TOKENS) // PAGE + 1
    pool = KVPool(model.config, num_pages=pages_each * len(prompts), page_size=PAGE, dtype=model.norm.weight.dtype)
    tables = [list(range(b * pages_each, (b + 1) * pages_each)) for b in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    new = [len(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for _ in range(NEW_TOKENS):
        next_ids = step(model, backend, pool, seqs, new, tables).argmax(-1).tolist()
        for seq, o, t in zip(seqs, out, next_ids):
            seq.append(t)
            o.append(t)
        new = [1] * len(prompts)
    return out


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    from pydoc_data.topics import topics

    folder = resolve_model_path(None)
    tokenizer = load_tokenizer(folder)
    text = "\n\n".join(topics[key] for key in sorted(topics))
    tokens = tokenizer(text)["input_ids"][:TOKENS]
    assert len(tokens) == TOKENS
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS
    ]
    prompts = [tokenizer(chat, add_special_tokens=False)["input_ids"] for chat in chats]
    backend = make_attention_backend("auto", "cpu")
    eos = set(read_model_config(folder).eos_token_ids)
    perplexities, outputs_of, seconds = {}, {}, {}
    for variant in ("float32", "bf16", "int8", "int4", "int4-head4", "gguf"):
        start = time.perf_counter()
        model = build(folder, variant)
        with torch.inference_mode():
            perplexities[variant] = perplexity(model, backend, tokens)
            outputs_of[variant] = greedy(model, backend, prompts)
        seconds[variant] = round(time.perf_counter() - start, 1)
        print(f"{variant}: perplexity {perplexities[variant]:.3f} ({seconds[variant]} s)", flush=True)
        del model
    print("  e.g.", repr(tokenizer.decode(outputs_of["bf16"][0])))
    rows = []
    for variant, outputs in outputs_of.items():
        row = {"variant": variant, "perplexity": round(perplexities[variant], 3)}
        for ref_name in ("bf16", "float32"):
            reference = outputs_of[ref_name]
            prefixes = [shared_prefix(o, r) for o, r in zip(outputs, reference)]
            answers = [next((i + 1 for i, t in enumerate(r) if t in eos), NEW_TOKENS) for r in reference]
            row[f"same 32 tokens as {ref_name}"] = f"{sum(p == NEW_TOKENS for p in prefixes)}/{len(prompts)}"
            row[f"same answer as {ref_name}"] = f"{sum(p >= a for p, a in zip(prefixes, answers))}/{len(prompts)}"
        rows.append({**row, "seconds": seconds[variant]})
    print(table(rows, list(rows[0])))
    path = save("quant_quality", {"tokens": TOKENS, "window": WINDOW, "prompts": len(prompts), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
