"""`radixrt generate | chat | serve | bench`: the command line."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import sys
from typing import NoReturn

from radixrt.engine_args import add_engine_args, engine_config
from radixrt.server.launch import add_server_args


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    g.add_argument("--top-k", type=int, default=-1, help="-1 = off (default: %(default)s)")
    g.add_argument("--seed-per-request", dest="request_seed", type=int, default=None, help="sampling seed")


def sampling_params(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.request_seed,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    from radixrt.engine import Engine

    with Engine(**dataclasses.asdict(engine_config(args))) as engine:
        if args.raw:
            stream = engine.generate_stream(args.prompt, sampling_params(args))
        else:
            stream = engine.chat_stream([{"role": "user", "content": args.prompt}], sampling_params(args))
        for chunk in stream:
            print(chunk.text, end="", flush=True)
        print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from radixrt.engine import Engine

    with Engine(**dataclasses.asdict(engine_config(args))) as engine:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        print("radixrt chat: type a message, /reset to start over, Ctrl-D to quit.")
        while True:
            try:
                line = input("> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if not line:
                continue
            if line == "/reset":
                messages = messages[:1] if args.system else []
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            for chunk in engine.chat_stream(messages, sampling_params(args)):
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
            print()
            messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_serve(args: argparse.Namespace) -> int:
    from radixrt.server.launch import serve

    return serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run bench/run_all.py from the source checkout this package was installed from."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "run_all.py"
    if not script.exists():
        print("radixrt bench needs a source checkout (bench/ is not installed with the package)", file=sys.stderr)
        return 2
    flags = (
        ["--quick"] * args.quick + ["--render-only"] * args.render_only + (["--only", args.only] if args.only else [])
    )
    return subprocess.call([sys.executable, str(script), *flags])


class FlagParser(argparse.ArgumentParser):
    """argparse, with its errors as one line that names the flag and, for an unknown one, the
    nearest flag this command has (a user coming from SGLang types SGLang's names)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            flags = [a for a in extra if a.startswith("-")]
            command = self._command_parser(parsed)
            if not flags:
                command.error(f"unexpected argument {extra[0]!r}")
            known = [s for a in command._actions for s in a.option_strings]
            close = difflib.get_close_matches(flags[0].split("=")[0], known, 1, 0.6)
            hint = f" (did you mean {close[0]}?)" if close else f"; see {command.prog} --help"
            command.error(f"unknown flag {flags[0]}{hint}")
        return parsed

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action.choices.get(getattr(parsed, action.dest, None), self)
        return self


def add_log_level(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """--log-level before or after the command (SGLang takes it among the server's flags)."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        default=default,
        help="logging level, any case (default: WARNING)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(prog="radixrt", description="A prefix-caching LLM runtime for agent programs.")
    add_log_level(parser, "WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a reply to one prompt and exit")
    gen.add_argument("prompt", help="the user message (or raw prompt with --raw)")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    add_log_level(gen)
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat, streaming")
    chat.add_argument("--system", default=None, help="system prompt")
    add_log_level(chat)
    add_sampling_args(chat)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="run every benchmark and render docs/benchmarks.md (see bench/run_all.py)")
    bench.add_argument("--quick", action="store_true", help="smoke-sized runs")
    bench.add_argument("--only", default="", help="comma-separated bench names, e.g. throughput,serve")
    bench.add_argument("--render-only", action="store_true", help="only re-render docs/benchmarks.md from results")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default: 127.0.0.1:30000)")
    add_log_level(serve)
    add_server_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"radixrt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
