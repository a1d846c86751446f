"""What the server decides by itself, apart from the engine (`EngineConfig`): `radixrt serve` flags.

Kept free of heavy imports: the command line builds its parser (and these defaults) on every run.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20

# `--tool-call-parser` / `--reasoning-parser`: SGLang's names for the output formats of the model
# families radixrt runs (server/tool_calls.py and server/reasoning.py implement them). The one place
# these lists live: the flags' choices and ServerSettings' check both read them.
TOOL_CALL_PARSERS = ("hermes", "qwen25", "qwen", "qwen3_coder", "llama3", "mistral", "pythonic")
REASONING_PARSERS = ("qwen3", "qwen3-thinking", "deepseek-r1")


@dataclass
class ServerSettings:
    """docs/server.md explains each limit and its default."""

    api_key: str | None = None
    served_model_name: str | None = None
    restart_worker: bool = True
    # A whole 128K-token prompt takes ~0.5 MiB as text, ~0.9 MiB as token ids. The request body is
    # the one input parsed on the event loop (JSON, then pydantic): the worst JSON of this size
    # (two million tiny values) holds it ~0.15 s on our CPU, a plain long prompt ~40 ms.
    max_request_bytes: int = 4 * MiB
    max_stop_strings: int = 16  # per prompt; stop_token_ids too
    max_stop_chars: int = 256  # per stop string
    max_prompt_chars: int | None = None  # None: twice what could fit the context (TokenizerManager)
    allowed_hosts: frozenset[str] | None = None  # Host header names answered; None: any
    tool_call_parser: str | None = None  # one of TOOL_CALL_PARSERS; None: radixrt's own tool-call format
    reasoning_parser: str | None = None  # one of REASONING_PARSERS; None: reasoning stays in the content

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("tool_call_parser", self.tool_call_parser, TOOL_CALL_PARSERS),
            ("reasoning_parser", self.reasoning_parser, REASONING_PARSERS),
        ):
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)} (got {value!r})")
