"""Speculative decoding (worker/speculative.py): drafts change how fast a request decodes, never what it outputs.

- Greedy output with n-gram drafts (the request's own tokens, the radix cache) and with a draft model
  equals the output without speculation, on prompts that repeat a span and prompts that do not; each
  run that should accept drafts is checked to have accepted some, and to leave no page used or locked.
- Pages, with the real scheduler, radix cache and speculator and a stand-in model that writes each
  position's token into a simulated KV pool: after verify steps that reject drafts, aborts between
  planning and the forward, preemption and eviction, every page is free, owned or cached exactly once,
  a request's page table covers just its computed tokens, and every cached page holds the tokens its
  tree path spells (a rejected draft's K/V never reaches the tree).
- Sampling: seeded requests give the same tokens with n-gram drafts; a draft model's rejection rule
  leaves the token distribution unchanged (chi-square, fixed seeds, p > 0.001).
- Constrained decoding and the default model, in float32 and with the defaults (bf16, the GGUF's 4-bit
  weights), where a row's logits do not depend on the step's other rows; with bf16 float weights
  torch's GEMM rounds multi-row forwards differently, as plain batching already does.
"""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch
from conftest import make_tiny_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from server_process import TINY_ARGS, running_server

from radixrt import Engine
from radixrt.cache.page_pool import PageAllocator
from radixrt.cache.radix_tree import RadixCache
from radixrt.config import EngineConfig
from radixrt.request import Req
from radixrt.sampling_params import SamplingParams
from radixrt.sampling_spec import accepted_run, rejection_sample
from radixrt.scheduler.scheduler import Scheduler
from radixrt.worker.draft_length import TOKEN_COST, Acceptance, StepTimes, draft_length
from radixrt.worker.speculative import Speculator
from radixrt.worker.text_lookup import TextLookup

GREEDY = {"max_new_tokens": 40, "min_new_tokens": 40, "temperature": 0}
PS = 4
NOISE = 0.3  # of each weight matrix's std, in the noisy draft model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Half repeat a span of themselves (prompt lookup finds drafts), half are random."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append([rng.randrange(3, 300) for _ in range(rng.randrange(5, 40))])
        else:
            span = [rng.randrange(3, 300) for _ in range(16)]
            out.append([rng.randrange(3, 300) for _ in range(5)] + span + [7] + span[:6])
    return out


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-draft"), "llama", seed=1, num_hidden_layers=1)


@pytest.fixture(scope="module")
def noisy_draft(tiny_llama, tmp_path_factory):
    """The target with noise on every matrix: q close to p but not equal, so both branches of the rule run."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("noisy-draft")
    shutil.copytree(tiny_llama, folder, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(2)
    for file in folder.glob("*.safetensors"):
        weights = load_file(file)
        noisy = {k: v + NOISE * v.std() * torch.randn(v.shape, generator=gen) if v.dim() > 1 else v
                 for k, v in weights.items()}  # fmt: skip
        save_file(noisy, file, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def reference(tiny_llama):
    with Engine(str(tiny_llama), page_size=PS) as engine:
        return [o.token_ids for o in engine.generate(input_ids=prompts(10), sampling_params=GREEDY)]


SPEC = {
    "ngram": ({"speculative_algorithm": "NGRAM"}, True),
    "ngram-cache": ({"speculative_algorithm": "NGRAM", "speculative_ngram_from_cache": True}, True),
    "ngram-fixed-k-tiny-pool": (
        {"speculative_algorithm": "NGRAM", "speculative_adaptive": False, "kv_memory_gb": 0.00005},
        True,
    ),
    "draft-is-target": ({"speculative_algorithm": "STANDALONE", "speculative_adaptive": False, "draft": "self"}, True),
    "draft-other": ({"speculative_algorithm": "STANDALONE", "speculative_adaptive": False, "draft": "other"}, False),
}


@pytest.mark.parametrize("name", SPEC)
def test_greedy_output_is_unchanged(tiny_llama, tiny_draft, reference, name):
    options, accepts = SPEC[name]
    options = dict(options)
    if "draft" in options:
        options["speculative_draft_model_path"] = str(tiny_llama if options.pop("draft") == "self" else tiny_draft)
    with Engine(str(tiny_llama), page_size=PS, **options) as engine:
        outs = engine.generate(input_ids=prompts(10), sampling_params=GREEDY)
        solo = [engine.generate(input_ids=p, sampling_params=GREEDY) for p in prompts(10)[:2]]  # cache holds them
        stats = engine.stats()
    assert [o.token_ids for o in outs] == reference
    assert [o.token_ids for o in solo] == reference[:2]
    assert stats.used_pages == 0 and stats.protected_pages == 0  # nothing leaked or left locked
    accepted = sum(o.usage.spec_accepted_tokens for o in outs + solo)
    assert stats.spec_accepted_tokens == accepted <= stats.spec_draft_tokens
    if accepts:
        assert accepted > 0, "no draft was accepted: the comparison proves nothing"
    if "kv_memory_gb" in options:
        assert stats.num_preemptions > 0 or stats.evicted_tokens > 0


def test_seeded_sampling_is_unchanged_by_ngram_drafts(tiny_llama):
    """An n-gram draft is kept exactly when sampling draws it, with the request's own noise: same tokens."""
    mixes = [(0.05, 0.0), (0.1, 0.3), (1.0, 0.0)] * 3  # (temperature, frequency_penalty): a random model's
    params = [{"max_new_tokens": 32, "temperature": t, "top_p": 0.9, "frequency_penalty": f, "seed": i,
               "logprobs": True} for i, (t, f) in enumerate(mixes)]  # fmt: skip  (logits are flat: T < 1 repeats)
    inputs = prompts(9, seed=3)
    with Engine(str(tiny_llama), page_size=PS) as engine:
        plain = engine.generate(input_ids=inputs, sampling_params=params)
    with Engine(str(tiny_llama), page_size=PS, speculative_algorithm="NGRAM", speculative_adaptive=False) as engine:
        spec = engine.generate(input_ids=inputs, sampling_params=params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert all(a == pytest.approx(b, abs=1e-4) for o, p in zip(spec, plain) for a, b in zip(o.logprobs, p.logprobs))
    assert sum(o.usage.spec_accepted_tokens for o in spec) > 0


def chi_square_p(counts_a: dict, counts_b: dict) -> float:
    """p-value of the chi-square test that two samples come from one distribution (torch's gammaincc)."""
    keys = sorted(set(counts_a) | set(counts_b))
    a = torch.tensor([counts_a.get(k, 0) for k in keys], dtype=torch.float64)
    b = torch.tensor([counts_b.get(k, 0) for k in keys], dtype=torch.float64)
    expected_a, expected_b = (a + b) * a.sum() / (a.sum() + b.sum()), (a + b) * b.sum() / (a.sum() + b.sum())
    stat = ((a - expected_a) ** 2 / expected_a + (b - expected_b) ** 2 / expected_b).sum()
    df = torch.tensor((len(keys) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def test_rejection_rule_keeps_the_target_distribution():
    """First token after one forced draft d ~ q: min(1, p/q) acceptance plus the residual gives p exactly."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 6) * 1.5, -1)
    q = torch.softmax(torch.randn(1, 6) * 1.5, -1)
    gen = torch.Generator().manual_seed(1)
    n = 20000
    drafts = torch.multinomial(q[0], n, replacement=True, generator=gen).tolist()
    firsts, kept = {}, 0
    for d in drafts:
        run = rejection_sample(p, q, [d], gen)
        firsts[run[0]] = firsts.get(run[0], 0) + 1
        kept += len(run) == 2
    expected = {t: int(round(float(p[0, t]) * n)) for t in range(6)}
    assert 0.1 * n < kept < 0.95 * n  # both branches of the rule ran
    assert chi_square_p(firsts, expected) > 1e-3
    assert accepted_run([5, 9, 4], [5, 2]) == [5, 9] and accepted_run([5, 2, 4], [5, 2]) == [5, 2, 4]


def test_draft_model_sampling_distribution_is_unchanged(tiny_llama, noisy_draft):
    """(first, second) token frequencies over 400 seeds, a draft always proposed for the second: chi-square."""
    params = [{"max_new_tokens": 3, "temperature": 1.0, "top_k": 3, "seed": i, "ignore_eos": True} for i in range(400)]
    inputs = [[5, 9, 13, 21]] * len(params)
    spec_options = dict(speculative_algorithm="STANDALONE", speculative_draft_model_path=str(noisy_draft),
                        speculative_adaptive=False, speculative_max_batch_size=64)  # fmt: skip
    counts = []
    for options in ({}, spec_options):
        with Engine(str(tiny_llama), page_size=PS, **options) as engine:
            outs = engine.generate(input_ids=inputs, sampling_params=params)
            stats = engine.stats()
        pairs = [tuple(o.token_ids[:2]) for o in outs]
        counts.append({k: pairs.count(k) for k in set(pairs)})
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # kept some, rejected some
    assert chi_square_p(*counts) > 1e-3


# ----- pages, with a stand-in for the model ------------------------------------------------------------


def check_pages(scheduler: Scheduler, allocator: PageAllocator, cache: RadixCache, kv: dict) -> None:
    free = [p for p in range(allocator.num_pages) if allocator._is_free[p]]
    cached = [p for node in cache._nodes() for p in node.pages]
    owned = [p for r in scheduler.running for p in r.page_table[r.num_tree_pages :]]
    assert sorted(free + cached + owned) == list(range(allocator.num_pages)), "a page is lost or in two places"
    for r in scheduler.running:
        assert len(r.page_table) * PS >= r.num_computed
        assert all(kv[r.page_table[i // PS], i % PS] == r.token_ids[i] for i in range(r.num_computed))
    for node in cache._nodes():  # each cached slot holds the token its path spells: no rejected draft
        path, up = [], node
        while up.parent is not None:
            path[:0] = up.key
            up = up.parent
        start = len(path) - len(node.key)
        assert all(kv[page, s] == path[start + i * PS + s] for i, page in enumerate(node.pages) for s in range(PS))


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 16), st.integers(1, 24)), min_size=1, max_size=10),
    num_pages=st.integers(16, 30),
    agree=st.floats(0.0, 1.0),
    abort_every=st.integers(0, 5),
    seed=st.integers(0, 1000),
)
def test_every_page_is_accounted_for_with_drafts(requests, num_pages, agree, abort_every, seed):
    rng = random.Random(seed)
    allocator = PageAllocator(num_pages)
    cache = RadixCache(PS, allocator)
    config = EngineConfig(page_size=PS, speculative_algorithm="NGRAM", speculative_num_draft_tokens=6,
                          speculative_adaptive=False, speculative_ngram_from_cache=True)  # fmt: skip
    scheduler = Scheduler(allocator, cache, policy="lpm", chunked_prefill_size=16, max_running_requests=4,
                          starvation_timeout_s=60, speculative_tokens=6)  # fmt: skip
    spec = Speculator(config, scheduler, cache, None, 1000, num_pages * PS, None)
    kv: dict[tuple[int, int], int] = {}
    planned = 0
    for i, (prefix, own, outputs) in enumerate(requests):
        pattern = [100 + prefix, 101, 102 + prefix] * (prefix + 2)
        scheduler.add(Req(f"r{i}", pattern + [200 + i] * own, SamplingParams(max_new_tokens=outputs)))
    for step in range(600):
        batch = scheduler.schedule()
        if batch is None:
            break
        drafts = spec.plan(batch.reqs, batch.num_new)
        for req, n, draft in zip(batch.reqs, batch.num_new, drafts):
            planned += len(draft)
            if abort_every and draft and rng.randrange(abort_every) == 0:
                scheduler.remove(req)  # a client that left between planning and the forward
                spec.discard(req)
                continue
            tokens = req.token_ids[req.num_computed : req.num_computed + n] + draft
            for p, token in enumerate(tokens, start=req.num_computed):
                kv[req.page_table[p // PS], p % PS] = token
            req.num_computed += n
            if req.num_computed < req.num_tokens:
                scheduler.cache_progress(req)
                continue
            sampled = [d if rng.random() < agree else 7 + rng.randrange(2) for d in draft] + [7]
            run = accepted_run(sampled, draft)[: req.params.max_new_tokens - len(req.output_ids)]
            for token in run:
                req.append_token(token)
            spec.commit(req, len(draft), len(accepted_run(sampled, draft)) - 1, len(run))
            assert len(req.page_table) == max(-(-req.num_computed // PS), req.num_tree_pages)
            if len(req.output_ids) >= req.params.max_new_tokens:
                scheduler.remove(req)
                spec.discard(req)
            elif n > 1:
                scheduler.cache_progress(req)
        check_pages(scheduler, allocator, cache, kv)
    assert not scheduler.has_work(), "the scheduler stopped making progress"
    assert cache.protected_pages == 0, "a lock outlived its request"
    assert allocator.num_free + cache.stats().cached_pages == num_pages
    if any(outputs >= 6 for _, _, outputs in requests):
        assert planned > 0, "no request drafted: the speculative paths did not run"


# ----- prompt lookup by characters -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from radixrt.model.loader import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path(None))  # the default model's BPE: ` Portsmouth` is one token


def test_text_lookup_drafts_a_copy_that_tokenizes_differently(tokenizer):
    """A JSON value opening with `P` has no token n-gram in a passage that holds ` Portsmouth`; by
    characters it is found at a word start, and the draft continues the model's token boundary."""
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt = ids("The hotel is in Portsmouth, near the sea. Call +44 23 9282 1000.")
    lookup = TextLookup(tokenizer, prompt)
    so_far = prompt + ids('{"city": "P')
    draft = lookup.propose(so_far, 3)
    assert len(draft) == 3 and tokenizer.decode(so_far[-1:] + draft) == "Portsmouth,"
    assert tokenizer.decode(lookup.propose(prompt + ids('{"phone": "+'), 32)).startswith("44 23 9282 1000")


def test_text_lookup_needs_a_word_start_or_three_characters(tokenizer):
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt = ids("An uPdate of the Quay Road.")
    lookup = TextLookup(tokenizer, prompt)
    # `P` after a quote starts a word: the `P` inside `uPdate` is no match, and no word starts with P
    assert lookup.propose(prompt + ids(' "P'), 4) == []
    # `Qu` starts a word in both: the draft follows `Quay`
    assert tokenizer.decode(lookup.propose(prompt + ids(' "Qu'), 2)).startswith("ay")
    # two characters inside a word are too few to trust; text found nowhere drafts nothing
    assert lookup.propose(prompt + ids(" xyzda"), 4) == []
    assert lookup.propose(prompt + ids(" nothing like it"), 4) == []


# ----- how many drafts ------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-3, 0.05), st.floats(0.0, 3.0), st.lists(st.integers(1, 200), min_size=2, max_size=60, unique=True))
def test_step_times_fit_the_forwards_timed(t0, ratio, tokens):
    """Forwards of several sizes on a line t0 + t1 N: the fit finds it (the prior's pull is small next to
    the data once N spreads over more than a few tokens); beta is that line's cost of a draft per request."""
    t1 = ratio * t0
    times = StepTimes()
    for n in (tokens * 60)[:120]:
        times.observe(n, t0 + t1 * n)
    if max(tokens) - min(tokens) < 8:
        return
    for n in tokens:
        assert times.seconds(n) == pytest.approx(t0 + t1 * n, rel=0.15)  # the prior pulls a steep line a little
    fit0, fit1 = times.line()
    assert times.beta(8, 8) == pytest.approx(fit1 * 8 / (fit0 + fit1 * 8))


def test_step_times_keep_the_prior_ratio_until_drafts_spread_the_tokens():
    times = StepTimes()
    assert times.beta(8, 8) == pytest.approx(TOKEN_COST * 8 / (1 + TOKEN_COST * 8))  # nothing timed yet
    for _ in range(100):
        times.observe(8, 0.010)  # plain decode steps of batch 8 only: the slope is not in the data
    t0, t1 = times.line()
    assert t0 + 8 * t1 == pytest.approx(0.010) and t1 / t0 == pytest.approx(TOKEN_COST)
    for _ in range(100):  # verify steps show that 8 more tokens cost 7 ms: a draft per request is dear now
        times.observe(8, 0.010)
        times.observe(16, 0.017)
    assert times.seconds(16) == pytest.approx(0.017, rel=0.01)
    assert times.beta(8, 8) == pytest.approx(0.7, rel=0.02)


def test_draft_length_weighs_acceptance_against_cost():
    sure, unsure = Acceptance(kept=19, rejected=1), Acceptance(kept=1, rejected=2)
    assert draft_length(sure, 8, beta=0.15) >= 5
    assert draft_length(sure, 8, beta=0.15, gamma=0.5) < draft_length(sure, 8, beta=0.15)
    assert draft_length(sure, 3, beta=0.15) == 3  # never more than the drafts on offer
    assert draft_length(Acceptance(kept=2, rejected=1), 8, beta=0.7) == 0  # at batch 8 a 0.67 rate does not pay
    # a request that does not pay probes with one draft now and then, the rarer the dearer a draft (not a
    # draft model: probe=False)
    assert [draft_length(unsure, 8, beta=0.7) for _ in range(140)].count(1) == 2
    rare = Acceptance(kept=1, rejected=6)
    assert [draft_length(rare, 8, beta=0.16) for _ in range(32)] == ([0] * 15 + [1]) * 2
    assert draft_length(unsure, 8, beta=0.7, probe=False) == 0
    assert draft_length(unsure, 8, beta=0.15) == 1  # at batch 1 even a third of drafts kept pays for one


# ----- the radix cache's continuation lookup --------------------------------------------------------


def test_cache_continuation_respects_salt_splits_and_eviction():
    allocator = PageAllocator(64)
    cache = RadixCache(2, allocator)
    first = [1, 2, 3, 4, 5, 6, 7, 8]
    cache.insert(first, allocator.alloc(4))
    assert cache.continuation([9, 3, 4], None, 3, window=2) == [5, 6, 7]
    assert cache.continuation([3, 4], "tenant", 3, window=2) == []  # another salt sees nothing
    branch = [1, 2, 3, 4, 10, 11, 12, 13]  # splits first's edge after (1 2 3 4); the latest (3, 4) is here now
    pages = allocator.alloc(2)
    already = cache.insert(branch, [*cache.match_prefix(branch[:4]).pages, *pages])
    assert already == 4
    assert cache.continuation([3, 4], None, 4, window=2) == [10, 11, 12, 13]
    assert cache.continuation([6, 7], None, 4, window=2) == [8]  # positions on first's path survived the split
    cache.evict(64)  # every unlocked leaf goes: the entries now point at evicted nodes
    assert cache.continuation([6, 7], None, 4, window=2) == []
    assert cache.continuation([3, 4], None, 2, window=2) == []


def test_eagle_is_refused_in_one_line():
    with pytest.raises(ValueError, match="EAGLE is not supported"):
        EngineConfig(speculative_algorithm="EAGLE")
    assert EngineConfig(speculative_algorithm="standalone", speculative_draft_model_path="x").speculative_algorithm == (
        "DRAFT"
    )


def test_server_reports_speculation_in_meta_info_and_metrics(tiny_llama):
    body = {"input_ids": [5, 6, 7, 8] * 20, "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
    with running_server(*TINY_ARGS, "--speculative-algorithm", "NGRAM", model=tiny_llama) as server:
        meta = server.post("/generate", body).json()["meta_info"]
        metrics = server.get("/metrics").text
    assert meta["spec_verify_ct"] > 0
    assert meta["spec_accept_length"] == pytest.approx(1 + meta["spec_accept_token_num"] / meta["spec_verify_ct"])
    assert 0 <= meta["spec_accept_token_num"] <= meta["spec_draft_token_num"]
    steps = re.search(r"^radixrt_spec_verify_steps_total\{[^}]*\} (\S+)$", metrics, re.M)
    assert steps and float(steps.group(1)) == meta["spec_verify_ct"], metrics
    assert re.search(r"^sglang:spec_accept_length\{[^}]*\} ", metrics, re.M), metrics


# ----- the default model -----------------------------------------------------------------------------

PASSAGE = (
    "The Meridian Hotel, at 42 Harbor Street in Portsmouth, opened in 1987 and has 214 rooms. Its manager, "
    "Eleanor Whitfield, says the renovation will cost 3.2 million pounds and finish in March 2025."
)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "street": {"type": "string"}, "city": {"type": "string"},
                   "manager": {"type": "string"}, "rooms": {"type": "integer"}},
    "required": ["name", "street", "city", "manager", "rooms"],
}  # fmt: skip


# With the defaults, the verify steps of this story at batch 1 once parted from plain decoding (two
# summation orders in the quantized kernel, one for a single row and one for several).
STORY = [{"role": "user", "content": "Write a short story about a dragon who learns to paint."}]


@pytest.mark.slow
@pytest.mark.parametrize(
    "weights",
    [{"dtype": "float32", "quantization": "none"}, {}],  # float32 everything; the defaults (bf16, 4-bit weights)
    ids=["float32", "defaults"],
)
def test_default_model_greedy_and_constrained_output_is_unchanged(weights):
    """With the defaults the quantized kernel computes each row alone (tests/test_quant.py), so a verify
    step's logits are a decode step's to the bit in bf16 too."""
    chats = [
        [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{PASSAGE}"}],
        [{"role": "user", "content": "Write a short poem about autumn."}],
        [{"role": "user", "content": f"Extract the hotel's details as JSON.\n\n{PASSAGE}"}],
    ]
    params = [{"max_new_tokens": 64, "temperature": 0}] * 2 + [
        {"max_new_tokens": 96, "temperature": 0, "json_schema": json.dumps(SCHEMA)}
    ]
    results = []
    for options in ({}, {"speculative_algorithm": "NGRAM"}):
        with Engine(**weights, **options) as engine:
            batched = engine.generate([engine.render_chat(c) for c in chats], params)
            alone = engine.chat(STORY, {"max_new_tokens": 256, "temperature": 0})  # one row a step, or 1 + k
            results.append([*batched, alone])
    plain, spec = results
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert spec[0].usage.spec_accepted_tokens > 10, "the repeated passage should be drafted and accepted"
    assert spec[2].usage.spec_accepted_tokens > 0
    assert json.loads(spec[2].text).keys() == SCHEMA["properties"].keys()
