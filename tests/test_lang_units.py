"""Units of the DSL with no model: the choice-ranking methods and the role blocks derived from chat templates."""

from __future__ import annotations

import math

import pytest

from radixrt.lang import chat_template
from radixrt.lang.backend.scoring import split_choices
from radixrt.lang.choices import greedy_token_selection, token_length_normalized, unconditional_likelihood_normalized


def entries(*logprobs: float) -> list[list]:
    return [[lp, i, None] for i, lp in enumerate(logprobs)]


def call(method, choices, cond, uncond=None):
    means = [sum(t[0] for t in c) / len(c) for c in cond]
    return method(
        choices=choices,
        normalized_prompt_logprobs=means,
        input_token_logprobs=cond,
        output_token_logprobs=[[] for _ in choices],
        unconditional_token_logprobs=uncond,
    )


def test_token_length_normalized_picks_best_mean_not_best_sum():
    # "long" sums lower (-3.0 vs -2.0) but is better per token (-1.0 vs -2.0).
    decision = call(token_length_normalized, ["short", "long"], [entries(-2.0), entries(-1.0, -1.0, -1.0)])
    assert decision.decision == "long"
    assert decision.meta_info["normalized_prompt_logprobs"] == [-2.0, -1.0]


def test_greedy_token_selection_decides_at_the_first_differing_token():
    # The second choice wins on token 0 even though its mean is worse.
    decision = call(greedy_token_selection, ["a", "b"], [entries(-0.5, -0.1), entries(-0.4, -9.0)])
    assert decision.decision == "b"


def test_greedy_token_selection_pads_a_shorter_choice_with_its_mean():
    # Tied on token 0; "ab" (mean -1.0) beats "abc"'s second token (-2.0).
    decision = call(greedy_token_selection, ["ab", "abc"], [entries(-1.0), entries(-1.0, -2.0)])
    assert decision.decision == "ab"
    assert decision.meta_info["greedy_logprob_matrix"] == [[-1.0, -1.0], [-1.0, -2.0]]


def test_unconditional_likelihood_normalized_subtracts_the_prior():
    # "common" is likely anywhere (prior -0.1), "rare" is unlikely anywhere (-5.0) but fits here.
    cond = [entries(-1.0, -1.0), entries(-2.0, -2.0)]
    uncond = [[[None, 0, None], [-0.1, 1, None]], [[None, 0, None], [-5.0, 1, None]]]
    decision = call(unconditional_likelihood_normalized, ["common", "rare"], cond, uncond)
    assert decision.decision == "rare"
    assert decision.meta_info["normalized_unconditional_prompt_logprobs"] == pytest.approx([-0.95, 0.5])
    with pytest.raises(ValueError, match="needs unconditional"):
        call(unconditional_likelihood_normalized, ["a"], [entries(-1.0)])
    assert unconditional_likelihood_normalized.requires_unconditional_logprobs
    assert not token_length_normalized.requires_unconditional_logprobs


def test_nan_score_never_wins():
    assert call(token_length_normalized, ["a", "b"], [entries(math.nan), entries(-9.0)]).decision == "b"


def test_split_choices_keeps_tokens_merged_across_the_boundary():
    vocab = {"ab": 1, "a": 2, "b": 3, "c": 4, "x": 5}

    def encode(text: str) -> list[int]:  # greedy longest match, so "a" + "b" merges into "ab"
        out, i = [], 0
        while i < len(text):
            n = 2 if text[i : i + 2] in vocab else 1
            out.append(vocab[text[i : i + n]])
            i += n
        return out

    plain, merged = split_choices(encode, "xa", ["c", "b"])
    assert plain.choice_ids == [4] and plain.start == 2  # "x" "a" | "c"
    assert merged.choice_ids == [1] and merged.start == 1  # "x" | "ab": scored from the merged token


CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nDefault prompt<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ m['role'] }}]{{ m['content'] }}[/{{ m['role'] }}]{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("template", [CHATML_WITH_DEFAULT_SYSTEM, LLAMA3_LIKE, None], ids=["chatml", "llama3", "tiny"])
@pytest.mark.parametrize("with_system", [True, False])
def test_role_blocks_reproduce_apply_chat_template(tokenizer, template, with_system):
    """Text built block by block equals the template's own rendering of the same messages."""
    if template is not None:  # None: the tiny checkpoint's own template
        tokenizer.chat_template = template
    tpl = chat_template.from_tokenizer(tokenizer)
    messages = ([{"role": "system", "content": "Be nice."}] if with_system else []) + [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = ""
    for i, m in enumerate(messages):
        text += tpl.prefix(m["role"], first=i == 0) + m["content"] + tpl.suffix(m["role"])
    assert text == tokenizer.apply_chat_template(messages, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert with_prompt == text + tpl.prefix("assistant", first=False)


def test_template_without_system_role_fails_only_when_system_is_used(tokenizer):
    tokenizer.chat_template = NO_SYSTEM
    tpl = chat_template.from_tokenizer(tokenizer)
    assert tpl.prefix("user", first=True) == "[user]"
    with pytest.raises(ValueError, match="cannot render a 'system' block.*rejects system"):
        tpl.prefix("system", first=True)


def test_model_without_template_uses_sglang_default(tokenizer):
    tokenizer.chat_template = None
    assert chat_template.from_tokenizer(tokenizer) is chat_template.DEFAULT
    with pytest.raises(ValueError, match="not a known role"):
        chat_template.DEFAULT.prefix("tool", first=False)
