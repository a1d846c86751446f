"""Sampling invariants: each test states, in its name and docstring, what must always hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from radixrt import _native
from radixrt.sampling import _TOP_P_DEPTHS, SamplingBatch, _apply_penalties, _top_p_floor, prompt_logprobs, sample
from radixrt.sampling import argmax as sampling_argmax
from radixrt.sampling_params import SamplingParams

V = 64
EOS = [2]


def make_batch(params, prompts=None, outputs=None, generators=None, eos=EOS, vocab=V):
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts or [[] for _ in range(n)],
        outputs or [[] for _ in range(n)],
        generators or [None] * n,
        eos,
        vocab,
        "cpu",
    )


def rand_logits(b, v=V, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits, params, n, allowed=None, seed=0):
    """`n` samples of a single row, drawn in one batch of n identical rows."""
    torch.manual_seed(seed)
    batch = make_batch([params] * n)
    return sample(logits.expand(n, -1).contiguous(), batch, allowed).token_ids


def test_greedy_is_argmax_and_fast_path_copies_nothing():
    logits = rand_logits(8)
    before = logits.clone()
    out = sample(logits, make_batch([SamplingParams(temperature=0.0)] * 8))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_logprobs is None
    assert torch.equal(logits, before)


def test_greedy_rows_stay_greedy_beside_sampled_rows():
    logits = rand_logits(6)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.5, top_p=0.9, top_k=10) for i in range(6)]
    for seed in range(20):
        torch.manual_seed(seed)
        out = sample(logits, make_batch(params)).token_ids
        assert torch.equal(out[::2], logits[::2].argmax(-1))


def test_truncation_to_one_token_is_greedy():
    """top_k=1, a tiny top_p, and min_p=1 each leave only the most likely token."""
    logits = rand_logits(1)
    best = int(logits.argmax())
    for params in (
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0),
        SamplingParams(top_p=1e-6, top_k=30, temperature=2.0),
    ):
        assert (draw(logits, params, 500) == best).all(), params


def test_min_p_one_keeps_every_tied_max():
    logits = torch.full((1, V), -5.0)
    logits[0, [3, 7]] = 4.0
    assert set(draw(logits, SamplingParams(min_p=1.0), 2000).tolist()) == {3, 7}


def test_top_k_only_samples_among_the_k_best():
    logits = rand_logits(1)
    best5 = set(logits[0].topk(5).indices.tolist())
    seen = set(draw(logits, SamplingParams(top_k=5, temperature=5.0), 4000).tolist())
    assert seen == best5  # high temperature: all five appear, nothing else


def test_top_k_mixed_with_rows_without_top_k():
    """The threshold path: rows with different k (and rows with none) each keep their own k."""
    n = 400
    logits = rand_logits(1).expand(3 * n, -1).contiguous()
    params = [SamplingParams(top_k=3, temperature=5.0), SamplingParams(temperature=5.0), SamplingParams(top_k=7)] * n
    torch.manual_seed(0)
    tokens = sample(logits, make_batch(params)).token_ids.view(n, 3)
    assert set(tokens[:, 0].tolist()) == set(logits[0].topk(3).indices.tolist())
    assert set(tokens[:, 2].tolist()) <= set(logits[0].topk(7).indices.tolist())
    assert len(set(tokens[:, 1].tolist())) > 7


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0)
    for top_k in (-1, 3):  # full sort and topk-candidate paths
        got = set(draw(logits, SamplingParams(top_p=0.7, top_k=top_k), 3000).tolist())
        assert got == {0, 1}, top_k


def test_top_p_floor_equals_the_full_sort_nucleus():
    """Without top_k, top_p looks 256 then 4096 tokens deep; a flat row needs the full sort."""
    v = 8000
    x = torch.randn(4, v, generator=torch.Generator().manual_seed(3))
    x[0] *= 8  # peaked: the nucleus lies in the best 256
    x[1] *= 0.1  # flat: 4096 tokens hold ~half the mass, so this row is sorted in full
    top_ps = [0.9, 0.9, 0.5, 1.0]  # row 2 (std 1, top_p 0.5) stops at 4096
    batch = make_batch([SamplingParams(top_p=p) for p in top_ps], vocab=v)
    floor = _top_p_floor(x, batch)
    for row, top_p in enumerate(top_ps):
        probs, order = x[row].softmax(-1).sort(descending=True)
        n_kept = int(((probs.cumsum(0) - probs) < top_p).sum()) if top_p < 1 else v
        assert set(torch.nonzero(x[row] >= floor[row]).squeeze(1).tolist()) == set(order[:n_kept].tolist())
    assert _TOP_P_DEPTHS[-1] < int((x[1] >= floor[1]).sum()) < v


def test_temperature_one_matches_softmax():
    """20k draws at temperature 1: empirical frequencies within 0.015 of softmax (seeded, cannot flake)."""
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    n = 20000
    counts = torch.bincount(draw(logits, SamplingParams(), n, seed=1234), minlength=6).float() / n
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.015)


def test_temperature_and_top_k_distribution():
    """Temperature 0.5 with top_k 3: frequencies match softmax(logits / 0.5) renormalized over the best 3."""
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    n = 20000
    counts = torch.bincount(draw(logits, SamplingParams(temperature=0.5, top_k=3), n), minlength=6).float() / n
    expected = torch.zeros(6)
    keep = torch.tensor([5, 0, 1])
    expected[keep] = (logits[0, keep] / 0.5).softmax(-1)
    assert torch.allclose(counts, expected, atol=0.015)


def test_seeded_row_ignores_the_rest_of_the_batch():
    """A request with a seed gets the same tokens whatever else is in the batch (and a new seed differs)."""
    logits = rand_logits(1) / 4  # flat enough that many tokens are likely

    def run(seeded: SamplingParams, others: list[SamplingParams], seed: int, steps: int = 30) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        params = [*others, seeded]
        rows = torch.cat([rand_logits(len(others), seed=99), logits])
        toks = []
        for step in range(steps):
            torch.manual_seed(1000 + step * 7 + len(others))  # a different global RNG stream each run
            batch = make_batch(params, generators=[None] * len(others) + [gen])
            toks.append(int(sample(rows, batch).token_ids[-1]))
        return toks

    for seeded in (SamplingParams(top_p=0.95, seed=7), SamplingParams(top_k=20, top_p=0.9, seed=7)):
        alone = run(seeded, [], 7)
        assert len(set(alone)) > 5
        assert run(seeded, [SamplingParams(temperature=0.8, top_k=5)] * 3, 7) == alone
        assert run(seeded, [SamplingParams(top_k=40, min_p=0.05), SamplingParams(top_k=3, top_p=0.5)], 7) == alone
        assert run(seeded, [SamplingParams(temperature=0.0), SamplingParams(seed=1)], 7) == alone
        assert run(seeded, [], 8) != alone


def test_repetition_penalty_matches_transformers():
    logits = rand_logits(2)
    prompts, outputs = [[1, 5, 5, 9], [3, 4]], [[10, 1], [60]]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=0.0)]
    batch = make_batch(params, prompts, outputs)
    ours = _apply_penalties(logits.clone(), batch)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompts[0] + outputs[0]]), logits[:1].clone())
    assert torch.allclose(ours[0], expected[0])
    assert torch.equal(ours[1], logits[1])  # a row without penalties is untouched


def test_frequency_presence_penalties_match_hand_computation():
    logits = rand_logits(1)
    prompt, output = [7, 7, 7], [4, 4, 4, 9, 12, 4]
    batch = make_batch([SamplingParams(frequency_penalty=0.5, presence_penalty=1.25)], [prompt], [output])
    expected = logits.clone()
    expected[0, 4] -= 0.5 * 4 + 1.25
    expected[0, 9] -= 0.5 + 1.25
    expected[0, 12] -= 0.5 + 1.25  # token 7 is only in the prompt: untouched
    assert torch.allclose(_apply_penalties(logits.clone(), batch), expected)


def test_penalties_change_the_greedy_choice():
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 2.0, 1.5
    params = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert int(sample(logits, make_batch([params], outputs=[[5]])).token_ids) == 6
    assert int(sample(logits, make_batch([params], outputs=[[6]])).token_ids) == 5


def test_min_new_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, V)
    logits[0, EOS[0]], logits[0, 11], logits[0, 20] = 9.0, 8.0, 1.0
    params = SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=[11])
    for n_out, expected in ((0, 20), (2, 20), (3, EOS[0]), (5, EOS[0])):
        batch = make_batch([params], outputs=[[30] * n_out])
        assert int(sample(logits, batch).token_ids) == expected, n_out
    # ignore_eos only means "do not stop at eos": it does not mask it.
    assert int(sample(logits, make_batch([SamplingParams(temperature=0.0, ignore_eos=True)])).token_ids) == EOS[0]


def test_min_new_tokens_yields_to_a_grammar_that_only_allows_eos():
    logits = rand_logits(1)
    allowed = torch.zeros(1, V, dtype=torch.bool)
    allowed[0, EOS[0]] = True
    batch = make_batch([SamplingParams(min_new_tokens=4)])
    assert int(sample(logits, batch, allowed).token_ids) == EOS[0]


def test_allowed_mask_is_never_violated_and_all_true_rows_are_unaffected():
    n = 200
    logits = rand_logits(4).repeat(n, 1)
    allowed = torch.ones(4, V, dtype=torch.bool)
    allowed[0] = False
    allowed[0, [3, 17, 40]] = True
    allowed[2] = torch.arange(V) % 2 == 1
    allowed = allowed.repeat(n, 1)
    kinds = [SamplingParams(temperature=2.0), SamplingParams(), SamplingParams(top_k=20), SamplingParams(temperature=0)]
    batch = make_batch(kinds * n)
    torch.manual_seed(0)
    masked = sample(logits, batch, allowed).token_ids.view(n, 4)
    torch.manual_seed(0)
    free = sample(logits, batch).token_ids.view(n, 4)
    assert set(masked[:, 0].tolist()) == {3, 17, 40}
    assert (masked[:, 2] % 2 == 1).all()
    assert torch.equal(masked[:, 1], free[:, 1]) and torch.equal(masked[:, 3], free[:, 3])


def test_logprobs_are_of_the_raw_distribution():
    logits = rand_logits(3)
    params = [
        SamplingParams(logprobs=True, top_logprobs=5, repetition_penalty=2.0),
        SamplingParams(temperature=0.0, top_logprobs=2),
        SamplingParams(temperature=0.3, top_k=4),
    ]
    out = sample(logits, make_batch(params, prompts=[[1, 2, 3]] * 3))
    logp = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, logp.gather(1, out.token_ids[:, None]).squeeze(1))
    vals, ids = logp.topk(5, dim=-1)
    assert torch.equal(out.top_logprob_ids, ids) and torch.allclose(out.top_logprobs, vals)


def test_prompt_logprobs_match_hand_computation():
    logits = rand_logits(5)
    next_ids = torch.tensor([3, 0, 63, 8, 8])
    chosen, top_ids, top_vals = prompt_logprobs(logits, next_ids, 3)
    for t in range(5):
        z = logits[t] - logits[t].max()
        logp = z - z.exp().sum().log()
        assert abs(float(chosen[t]) - float(logp[next_ids[t]])) < 1e-5
        assert top_ids[t].tolist() == sorted(range(V), key=lambda i: -float(logp[i]))[:3]
        assert torch.allclose(top_vals[t], logp[top_ids[t]])
    assert prompt_logprobs(logits, next_ids, 0)[1].shape == (5, 0)


def test_batch_flags_skip_unrequested_work():
    batch = make_batch([SamplingParams(temperature=0.0, top_k=5, top_p=0.5), SamplingParams()])
    assert not (batch.all_greedy or batch.any_top_k or batch.any_top_p or batch.any_min_p)
    assert not (batch.any_penalty or batch.any_min_tokens or batch.any_logprobs)
    batch = make_batch([SamplingParams(top_k=5, min_p=0.1, top_logprobs=3, frequency_penalty=0.1, min_new_tokens=1)])
    assert batch.any_top_k and batch.any_min_p and batch.any_penalty and batch.any_min_tokens
    assert batch.any_logprobs and batch.max_top_logprobs == 3


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {
                "temperature": st.sampled_from([0.0, 0.5, 1.0, 2.0]),
                "top_k": st.sampled_from([-1, 1, 3, 20]),
                "top_p": st.sampled_from([1.0, 0.9, 0.3]),
                "min_p": st.sampled_from([0.0, 0.1]),
                "repetition_penalty": st.sampled_from([1.0, 1.2]),
                "frequency_penalty": st.sampled_from([0.0, 0.5]),
            }
        ),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_any_parameter_mix_respects_mask_and_greedy(rows, seed):
    """Whatever the mix of options: no disallowed token, and greedy rows take the argmax of the penalized logits."""
    b = len(rows)
    params = [SamplingParams(**r) for r in rows]
    logits = rand_logits(b, seed=seed)
    allowed = torch.rand(b, V, generator=torch.Generator().manual_seed(seed)) < 0.5
    allowed[:, 0] = True
    outputs = [[1, 2, 2, 5]] * b
    batch = make_batch(params, prompts=[[9, 9]] * b, outputs=outputs)
    tokens = sample(logits, batch, allowed).token_ids
    assert allowed.gather(1, tokens[:, None]).all()
    expected = _apply_penalties(logits.masked_fill(~allowed, float("-inf")), batch).argmax(-1)
    for i, p in enumerate(params):
        if p.temperature == 0.0:
            assert tokens[i] == expected[i]


_ops = _native.load()


@pytest.mark.skipif(_ops is None, reason=f"native kernels unavailable: {_native.load_error()}")
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(1, 70),
    levels=st.integers(1, 4),
    specials=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 69), st.sampled_from(["inf", "-inf", "nan"]))),
    seed=st.integers(0, 2**16),
)
def test_native_argmax_is_torchs_first_maximum(rows, vocab, levels, specials, seed):
    """The native argmax answers what torch does: the first index of the largest value (few
    distinct levels make ties common), the first NaN in a row that has one, 0 in an all -inf row;
    both its AVX-512 and its portable loop, on contiguous rows and on a strided view."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (rows, vocab + 3), generator=g).float()
    for r, j, value in specials:
        if r < rows and j < vocab:
            x[r, j] = float(value)
    if rows > 1:
        x[-1, :vocab] = float("-inf")
    view = x[:, :vocab]
    for simd in (True, False):
        assert torch.equal(_ops.argmax_rows(view, simd), view.argmax(dim=-1))
    assert torch.equal(sampling_argmax(view), view.argmax(dim=-1))
