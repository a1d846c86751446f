"""What every example shares: `--max-tokens` / `--model` flags and the backend to run on.

Set RADIXRT_EXAMPLE_MAX_TOKENS to shorten every example's generations (CI does).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import radixrt as sgl


def parse_args(description: str, argv: list[str] | None, max_tokens: int, **extra: tuple) -> argparse.Namespace:
    """`extra`: name -> (type, default, help) for example-specific flags."""
    parser = argparse.ArgumentParser(description=description)
    default = int(os.environ.get("RADIXRT_EXAMPLE_MAX_TOKENS", max_tokens))
    parser.add_argument("--max-tokens", type=int, default=default, help="per generation (default: %(default)s)")
    parser.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--url", default=None, help="a running `radixrt serve` to use instead of an in-process engine")
    for name, (kind, value, text) in extra.items():
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=kind, default=value, help=f"{text} (default: %(default)s)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def backend_for(args: argparse.Namespace, backend=None):
    """The given backend, else a server at --url, else an in-process Engine (shut down after)."""
    if backend is not None:
        yield backend
    elif args.url:
        yield sgl.RuntimeEndpoint(args.url, api_key=os.environ.get("RADIXRT_API_KEY"))
    else:
        with sgl.Engine(args.model) as engine:
            yield engine
