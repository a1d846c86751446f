"""Tool-call and reasoning parsers: each model family's format on hand-written replies; the same
replies streamed in random pieces (the deltas must say what the whole reply says: a call's first
delta carries its id and name, its argument fragments concatenate to its final arguments); then over
HTTP with the official openai client and the default model, its output forced by a grammar where a
135M model would not write the format by itself.
"""

from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest
from server_process import KEY, running_server

import radixrt as sgl
from radixrt.lang.backend.runtime_endpoint import RuntimeEndpoint
from radixrt.server.chat_reply import ReplyStream, reply_message
from radixrt.server.protocol import ChatCompletionRequest
from radixrt.server.reasoning import PARSERS as REASONING
from radixrt.server.reasoning import ReasoningParser, split
from radixrt.server.settings import REASONING_PARSERS, TOOL_CALL_PARSERS
from radixrt.server.tool_calls import FORMATS, ToolPlan, plan_tools, template_convention

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer"}}, "required": ["city"]}
TIME = {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}
TOOLS = {"get_weather": WEATHER, "get_time": TIME}
W = ("get_weather", {"city": "Paris", "unit": "celsius"})
T = ("get_time", {"tz": "Europe/Zürich \"CET\""})
W_JSON, T_JSON = json.dumps(W[1]), json.dumps(T[1], ensure_ascii=False)

# (style, reply, content, calls): each family's way of writing calls, as a model writes it.
REPLIES = [
    ("hermes", f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {W_JSON}}}\n</tool_call>',
     "Let me check.", [W]),
    ("hermes", f'<tool_call>{{"name": "get_weather", "arguments": {W_JSON}}}</tool_call>\n'
               f'<tool_call>{{"name": "get_time", "arguments": {T_JSON}}}</tool_call>', None, [W, T]),
    ("hermes", '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"Europe/Z\\u00fcrich \\\\\\"CET\\\\\\"\\"}"}'
               "</tool_call>", None, [T]),  # arguments as a JSON string: decoded
    ("llama3", f'{{"name": "get_weather", "parameters": {W_JSON}}}', None, [W]),
    ("llama3", f'<|python_tag|>{{"name": "get_weather", "parameters": {W_JSON}}}; '
               f'{{"name": "get_time", "parameters": {T_JSON}}}', None, [W, T]),
    ("mistral", f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {W_JSON}}}, '
                f'{{"name": "get_time", "arguments": {T_JSON}}}]', None, [W, T]),
    ("qwen3_coder", "I will look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>", "I will look.", [W]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=days>\n3\n"
                    "</parameter>\n</function>\n</tool_call>", None, [("get_weather", {"city": "Rome", "days": 3})]),
    ("pythonic", '[get_weather(city="Paris", unit="celsius"), get_time(tz="Europe/Zürich \\"CET\\"")]', None, [W, T]),
    ("forced", f'{{"name": "get_weather", "arguments": {W_JSON}}}', None, [W]),
]
NOT_CALLS = [  # no call to an offered tool: the reply is content, as written
    ("hermes", "<tool_call>{bad json</tool_call> sorry"),
    ("hermes", '<tool_call>{"name": "send_email", "arguments": {}}</tool_call>'),
    ("hermes", "Plain text with a <tool_cal"),
    ("llama3", '{"answer": 42, "name": "get_wea'),  # cut inside the name: not a call yet
    ("llama3", 'The JSON is {"name": "get_time", "parameters": {}}'),  # not the whole reply
    ("mistral", "[1, 2, 3]"),
    ("qwen3_coder", "<tool_call>\n<function=unknown>\n</function>\n</tool_call>"),
    ("pythonic", "[print(1)]"),
    ("pythonic", "[get_time(tz=open('x'))]"),  # not a literal: never evaluated
]


def plan(style: str) -> ToolPlan:
    tools = {"get_weather": WEATHER} if style == "forced" else TOOLS
    return ToolPlan(tools=tools, style=style)


def streamed(style: str, text: str, pieces, reasoning: str | None = None, reason: str = "stop") -> dict:
    """Feed `text` cut at `pieces`; check each delta's shape; return the reply the deltas add up to."""
    stream = ReplyStream(plan(style), reasoning, constrained=style == "forced")
    deltas = [d for piece in pieces for d in stream.feed(piece)]
    more, finish = stream.finish(reason)
    out: dict = {"content": "", "reasoning_content": "", "calls": {}, "finish_reason": finish}
    for delta in deltas + more:
        assert len(delta) == 1, delta  # one kind of field per chunk
        for call in delta.get("tool_calls", []):
            if call["index"] not in out["calls"]:  # the first delta of a call carries its id and name
                assert call["id"].startswith("call_") and call["type"] == "function" and call["function"]["name"]
                out["calls"][call["index"]] = [call["function"]["name"], call["function"]["arguments"], 1]
            else:
                assert set(call) == {"index", "function"} and set(call["function"]) == {"arguments"}
                out["calls"][call["index"]][1] += call["function"]["arguments"]
                out["calls"][call["index"]][2] += 1
        out["content"] += delta.get("content", "")
        out["reasoning_content"] += delta.get("reasoning_content", "")
    return out


def random_pieces(text: str, seed: int) -> list[str]:
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8, 13])
        pieces.append(text[i : i + n])
        i += n
    return pieces


# ----- tool-call formats --------------------------------------------------------------------------
@pytest.mark.parametrize("style,text,content,calls", REPLIES, ids=[f"{r[0]}-{i}" for i, r in enumerate(REPLIES)])
def test_each_format_is_read(style, text, content, calls):
    message, reason = reply_message(text, "stop", plan(style), None, False)
    assert reason == "tool_calls" and message["content"] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in message["tool_calls"])


@pytest.mark.parametrize("style,text,content,calls", REPLIES, ids=[f"{r[0]}-{i}" for i, r in enumerate(REPLIES)])
def test_streamed_in_random_pieces_says_the_same(style, text, content, calls):
    message, _ = reply_message(text, "stop", plan(style), None, False)
    final = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
    for seed in range(25):
        out = streamed(style, text, random_pieces(text, seed))
        assert [tuple(out["calls"][i][:2]) for i in sorted(out["calls"])] == final, seed
        assert (out["content"].strip() or None) == content and out["finish_reason"] == "tool_calls"
    one_by_one = streamed(style, text, list(text))
    assert [tuple(one_by_one["calls"][i][:2]) for i in sorted(one_by_one["calls"])] == final


def test_arguments_stream_as_they_are_generated():
    """A long argument arrives in many fragments, not at the end; each prefix sent is final."""
    args = {"city": "Llanfair" * 20, "unit": "celsius"}
    text = json.dumps({"name": "get_weather", "arguments": args})
    out = streamed("forced", text, list(text))
    name, arguments, fragments = out["calls"][0]
    assert name == "get_weather" and json.loads(arguments) == args and fragments > 20


@pytest.mark.parametrize("style,text", NOT_CALLS, ids=[f"{s}-{i}" for i, (s, _) in enumerate(NOT_CALLS)])
def test_replies_without_a_call_are_content(style, text):
    message, reason = reply_message(text, "stop", plan(style), None, False)
    assert message == {"role": "assistant", "content": text} and reason == "stop"
    for seed in range(5):
        out = streamed(style, text, random_pieces(text, seed))
        assert out["content"] == text and not out["calls"] and out["finish_reason"] == "stop"


def test_a_call_cut_by_max_tokens_keeps_its_partial_arguments():
    """As OpenAI does: finish_reason "length", the arguments as far as they were generated."""
    text = '{"name": "get_weather", "arguments": {"city": "Par'
    message, reason = reply_message(text, "length", plan("forced"), None, False)
    assert reason == "length" and message["tool_calls"][0]["function"]["arguments"] == '{"city": "Par'
    out = streamed("forced", text, random_pieces(text, 3), reason="length")
    assert out["calls"][0][1] == '{"city": "Par' and out["finish_reason"] == "length"
    cut_in_name = reply_message('{"name": "get_we', "length", plan("forced"), None, False)
    assert cut_in_name == ({"role": "assistant", "content": '{"name": "get_we'}, "length")


def test_every_offered_parser_is_implemented():
    """The --tool-call-parser / --reasoning-parser choices are the formats these modules read."""
    assert set(FORMATS) == set(TOOL_CALL_PARSERS) and REASONING == REASONING_PARSERS
    assert FORMATS["qwen"] == FORMATS["qwen25"] == "hermes"
    for name in REASONING_PARSERS:
        ReasoningParser(name)


def test_the_flag_wins_and_the_template_is_the_fallback():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                 tools=[{"type": "function", "function": {"name": "get_time", "parameters": TIME}}])
    hermes_template = "{% if tools %}<tool_call>{{ tools }}</tool_call>{% endif %}"
    assert template_convention(hermes_template) == "hermes" and template_convention("{{ messages }}") is None
    assert template_convention('{{ tools }} [TOOL_CALLS]') == "mistral"
    assert plan_tools(body, hermes_template).style == "hermes"
    assert plan_tools(body, hermes_template, "llama3").style == "llama3"
    assert plan_tools(body, None, "qwen25").style == "hermes"
    assert plan_tools(body, "{{ messages }}").style is None  # SmolLM2: plain content


# ----- reasoning -----------------------------------------------------------------------------------
THOUGHTS = [  # (parser, reply, reasoning, answer)
    ("deepseek-r1", "The user asks for 2+2.\nThat is 4.\n</think>\n\nThe answer is 4.",
     "The user asks for 2+2.\nThat is 4.\n", "The answer is 4."),
    ("deepseek-r1", "<think>\nShort.</think>Paris", "Short.", "Paris"),  # R1-0528 writes the opening tag too
    ("deepseek-r1", "Still thinking when max_tokens ran out", "Still thinking when max_tokens ran out", ""),
    ("qwen3", "<think>\nParis is in France.\n</think>\n\nParis.", "Paris is in France.\n", "Paris."),
    ("qwen3", "Paris. No <think> here", "", "Paris. No <think> here"),  # no block: all answer, as written
    ("qwen3-thinking", "x < y holds.</think>Yes", "x < y holds.", "Yes"),
]


@pytest.mark.parametrize("name,text,reasoning,answer", THOUGHTS, ids=[f"{t[0]}-{i}" for i, t in enumerate(THOUGHTS)])
def test_reasoning_is_split_whole_and_streamed(name, text, reasoning, answer):
    assert split(name, text) == (reasoning, answer)
    for seed in range(25):
        parser, got = ReasoningParser(name), ["", ""]
        for piece in random_pieces(text, seed):
            for k, part in enumerate(parser.feed(piece)):
                got[k] += part
        for k, part in enumerate(parser.finish()):
            got[k] += part
        assert tuple(got) == (reasoning, answer), seed


def test_under_a_grammar_only_an_explicit_block_is_reasoning():
    """deepseek-r1 assumes the reply starts inside <think>; a grammar decides the first token, so a
    forced JSON reply is the answer, not thinking."""
    assert split("deepseek-r1", '{"a": 1}', starts_inside=False) == ("", '{"a": 1}')
    assert split("deepseek-r1", "<think>hm</think>{}", starts_inside=False) == ("hm", "{}")


def test_thinking_then_a_tool_call():
    call = f'<tool_call>{{"name": "get_weather", "arguments": {W_JSON}}}</tool_call>'
    text = f"<think>\nThe user wants weather.\n</think>\n\n{call}"
    message, reason = reply_message(text, "stop", plan("hermes"), "qwen3", False)
    assert message["reasoning_content"] == "The user wants weather.\n" and message["content"] is None
    assert reason == "tool_calls" and json.loads(message["tool_calls"][0]["function"]["arguments"]) == W[1]
    for seed in range(10):
        out = streamed("hermes", text, random_pieces(text, seed), reasoning="qwen3")
        assert out["reasoning_content"] == "The user wants weather.\n" and out["calls"][0][1] == W_JSON


# ----- over HTTP, the default model -----------------------------------------------------------------
GET_TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                             "parameters": {"type": "object", "properties": {
                                                 "tz": {"enum": ["UTC", "CET", "PST"]}}, "required": ["tz"]}}}
GET_WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                "parameters": WEATHER}}
THINK = r"<think>[a-z]{2,12}( [a-z]{2,12}){1,6}</think>[A-Z][a-z]{1,12}\."  # deepseek-r1's shape, forced


@pytest.fixture(scope="module")
def smol():
    with running_server("--kv-memory-gb", "0.25", "--reasoning-parser", "deepseek-r1",
                        "--tool-call-parser", "hermes") as server:
        yield server


@pytest.fixture
def client(smol):
    return openai.OpenAI(base_url=smol.url + "/v1", api_key=KEY, max_retries=0, timeout=180)


def ask(client, content: str, **kw):
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


@pytest.mark.slow
def test_openai_client_streams_a_forced_call_in_fragments(client):
    chunks = list(ask(client, "What is the weather in Paris, in celsius?", max_tokens=60, stream=True,
                      tools=[GET_WEATHER, GET_TIME], tool_choice="required"))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    first = calls[0]
    assert first.id.startswith("call_") and first.type == "function" and first.function.name in TOOLS
    assert all(tc.index == 0 for tc in calls) and not any(tc.id or tc.function.name for tc in calls[1:])
    fragments = [tc.function.arguments for tc in calls if tc.function.arguments]
    assert len(fragments) >= 2  # sent as generated, not at the end
    jsonschema.validate(json.loads("".join(fragments)), TOOLS[first.function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.mark.slow
def test_tool_call_parser_flag_reads_hermes_calls(client):
    """--tool-call-parser hermes: a reply in Hermes' tags (forced here by a regex) is a call."""
    regex = r'<tool_call>\{"name": "get_time", "arguments": \{"tz": "(UTC|CET)"\}\}</tool_call>'
    r = ask(client, "What time is it in Berlin?", max_tokens=40, tools=[GET_TIME], extra_body={"regex": regex})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["tz"] in ("UTC", "CET")
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    chunks = list(ask(client, "What time is it in Berlin?", max_tokens=40, tools=[GET_TIME], stream=True,
                      extra_body={"regex": regex}))
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert "".join(tc.function.arguments or "" for tc in calls) == call.function.arguments


@pytest.mark.slow
def test_reasoning_content_is_split_from_content(client):
    r = ask(client, "Think, then name a city.", max_tokens=80, extra_body={"regex": THINK})
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in reasoning and "</think>" not in message.content
    assert message.content[0].isupper() and message.content.endswith(".")
    chunks = list(ask(client, "Think, then name a city.", max_tokens=80, stream=True, extra_body={"regex": THINK}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.content or "" for d in deltas) == message.content
    plain = ask(client, "Think, then name a city.", max_tokens=80,
                extra_body={"regex": THINK, "separate_reasoning": False})
    assert plain.choices[0].message.content.startswith("<think>")


SETS = {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                  "maxItems": 3, "uniqueItems": True},
                                         "code": {"type": "string", "pattern": "^(?=[A-Z])[A-Z0-9]{3}$"}},
        "required": ["tags", "code"]}


@pytest.mark.slow
def test_lenient_response_format_says_what_it_did_not_enforce(client, smol):
    fmt = {"type": "json_schema", "json_schema": {"name": "labels", "schema": SETS}}  # strict absent: lenient
    r = ask(client, "Give two colour tags and a code in JSON.", max_tokens=60, response_format=fmt)
    dropped = r.model_extra["radixrt_unenforced"]
    assert dropped == ["/properties/tags/uniqueItems", "/properties/code/pattern"]
    if r.choices[0].finish_reason == "stop":
        from radixrt.constrained.lenient import enforced

        jsonschema.validate(json.loads(r.choices[0].message.content), enforced(SETS, dropped))
    strict = {"type": "json_schema", "json_schema": {"name": "labels", "schema": SETS, "strict": True}}
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, "Tags?", max_tokens=20, response_format=strict)
    assert "uniqueItems" in str(info.value) and info.value.body["param"] == "response_format"
    native = httpx.post(smol.url + "/generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=120, json={
        "text": "Tags:", "sampling_params": {"max_new_tokens": 30, "temperature": 0, "json_schema": json.dumps(SETS),
                                             "json_schema_strict": False}}).json()
    assert native["meta_info"]["unenforced"] == dropped


@pytest.mark.slow
def test_dsl_gen_separate_reasoning(smol):
    @sgl.function
    def think(s):
        s += sgl.user("Think, then name a city.")
        s += sgl.assistant(sgl.gen("answer", max_tokens=80, temperature=0, regex=THINK, separate_reasoning=True))

    state = think.run(backend=RuntimeEndpoint(smol.url, api_key=KEY))
    assert state["answer_reasoning_content"] and state["answer"].endswith(".")
    assert "<think>" not in state["answer"] and "<think>" not in state.text() and state["answer"] in state.text()
