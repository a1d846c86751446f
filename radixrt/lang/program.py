"""`@function` programs: `run` one, `run_batch` many (the batch's common prefix cached first)."""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from radixrt.lang import ir
from radixrt.lang.backend.base import BaseBackend
from radixrt.lang.backend.registry import resolve_backend
from radixrt.lang.interpreter import StreamExecutor
from radixrt.lang.state import ProgramState

# A batch prefix shorter than this is not worth a separate caching request (SGLang's threshold).
MIN_PRECACHE_CHARS = 64


class SglFunction:
    """A program: a Python function whose first argument is the program state."""

    def __init__(self, func: Callable, num_api_spec_tokens: int | None = None, bind_arguments: dict | None = None):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = bind_arguments or {}
        params = list(inspect.signature(func).parameters.values())
        if not params:
            raise TypeError(f"{func.__name__}: a program's first argument is the program state")
        self.arg_names = [p.name for p in params[1:]]
        self.arg_defaults = [p.default for p in params[1:] if p.default is not inspect.Parameter.empty]
        self.__name__ = getattr(func, "__name__", "program")
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> "SglFunction":
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.__name__}() has no argument(s) {', '.join(sorted(unknown))}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def run(
        self,
        *args: Any,
        max_new_tokens: int = 128,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        ignore_eos: bool = False,
        return_logprob: bool | None = None,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None,
        stream: bool = False,
        backend: Any = None,
        **kwargs: Any,
    ) -> ProgramState:
        """Run the program; the sampling arguments are the defaults for every gen in it.

        Raises the program's error (after recording it in the state). With `stream=True` it
        returns at once: read with `state.text_iter(name)`; errors stay in `state.error()`.
        """
        defaults = _defaults(
            max_new_tokens=max_new_tokens, stop=stop, stop_token_ids=stop_token_ids, temperature=temperature,
            top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
        )  # fmt: skip
        return run_program(self, resolve_backend(backend), args, kwargs, defaults, stream)

    def run_batch(
        self,
        batch_kwargs: list[dict[str, Any]] | list[list | tuple],
        *,
        max_new_tokens: int = 128,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        ignore_eos: bool = False,
        return_logprob: bool | None = None,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None,
        backend: Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
    ) -> list[ProgramState]:
        """Run the program once per argument set, concurrently; states come back in order.

        A failing program does not stop the others: its state's `error()` holds the cause.
        """
        if not isinstance(batch_kwargs, (list, tuple)):
            raise TypeError("run_batch takes a list of argument dicts (or of positional argument lists)")
        batch = [self._as_kwargs(a) for a in batch_kwargs]
        if not batch:
            return []
        defaults = _defaults(
            max_new_tokens=max_new_tokens, stop=stop, stop_token_ids=stop_token_ids, temperature=temperature,
            top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
        )  # fmt: skip
        return run_program_batch(self, resolve_backend(backend), batch, defaults, num_threads, progress_bar)

    def _as_kwargs(self, arguments: Any) -> dict[str, Any]:
        if isinstance(arguments, dict):
            return arguments
        if isinstance(arguments, (list, tuple)):
            required = len(self.arg_names) - len(self.arg_defaults)
            if required <= len(arguments) <= len(self.arg_names):
                return dict(zip(self.arg_names, arguments))
        raise TypeError(f"{self.__name__}: batch arguments {arguments!r} do not match ({', '.join(self.arg_names)})")

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)


def _defaults(stop, stop_token_ids, **values: Any) -> ir.SglSamplingParams:
    return ir.SglSamplingParams(stop=stop or (), stop_token_ids=stop_token_ids or (), **values)


def run_program(
    program: SglFunction,
    backend: BaseBackend,
    args: tuple,
    kwargs: dict[str, Any],
    defaults: ir.SglSamplingParams,
    stream: bool,
    raise_errors: bool = True,
) -> ProgramState:
    kwargs = {**program.bind_arguments, **kwargs}
    state = ProgramState(StreamExecutor(backend, kwargs, defaults, stream=stream))
    if stream:
        threading.Thread(target=_run, args=(state, program, args, kwargs), daemon=True).start()
        return state
    _run(state, program, args, kwargs)
    if raise_errors and state.stream_executor.error_ is not None:
        raise state.stream_executor.error_
    return state


def _run(state: ProgramState, program: SglFunction, args: tuple, kwargs: dict[str, Any]) -> None:
    executor = state.stream_executor
    try:
        state.ret_value = program.func(state, *args, **kwargs)
    except Exception as exc:
        executor.sync()
        executor.fail(exc)
    finally:
        executor.end()
        executor.sync()


def run_program_batch(
    program: SglFunction,
    backend: BaseBackend,
    batch: list[dict[str, Any]],
    defaults: ir.SglSamplingParams,
    num_threads: int | str,
    progress_bar: bool,
) -> list[ProgramState]:
    if len(batch) > 1:
        precache_common_prefix(program, backend, batch, defaults)
    if num_threads == "auto":
        num_threads = max(96, (os.cpu_count() or 1) * 16)
    num_threads = max(1, min(int(num_threads), len(batch)))
    pbar = None
    if progress_bar:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(batch), desc=program.__name__)

    def one(kwargs: dict[str, Any]) -> ProgramState:
        state = run_program(program, backend, (), kwargs, defaults, stream=False, raise_errors=False)
        if pbar is not None:
            pbar.update()
        return state

    try:
        with ThreadPoolExecutor(num_threads, thread_name_prefix="radixrt-batch") as pool:
            return list(pool.map(one, batch))
    finally:
        if pbar is not None:
            pbar.close()


class _StopTrace(Exception):
    pass


class _TracingBackend(BaseBackend):
    """Stands in for the real backend while a program is traced: the first model call ends it."""

    def __init__(self, real: BaseBackend) -> None:
        self.chat_template = real.get_chat_template()

    def generate(self, s, sampling_params):
        raise _StopTrace

    generate_stream = select = cache_prefix = generate  # type: ignore[assignment]


def traced_prefix(program: SglFunction, backend: BaseBackend, kwargs: dict, defaults: ir.SglSamplingParams) -> str:
    """The text a program builds before its first model call (its code runs up to that point)."""
    kwargs = {**program.bind_arguments, **kwargs}
    executor = StreamExecutor(_TracingBackend(backend), kwargs, defaults, use_thread=False)
    try:
        program.func(ProgramState(executor), **kwargs)
    except Exception:
        pass  # _StopTrace, or anything that needs a model answer: the prefix so far is what we want
    return executor.text_


def precache_common_prefix(
    program: SglFunction, backend: BaseBackend, batch: list[dict], defaults: ir.SglSamplingParams
) -> str:
    """Cache the text every program of the batch starts with, before they all ask for it at once.

    Traced on the first, middle and last argument sets; their common start is the prefix.
    """
    samples = {0: None, len(batch) // 2: None, len(batch) - 1: None}
    prefix = os.path.commonprefix([traced_prefix(program, backend, batch[i], defaults) for i in samples])
    if len(prefix) >= MIN_PRECACHE_CHARS:
        backend.cache_prefix(prefix)
    return prefix
