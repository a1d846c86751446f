"""ProgramState (the `s` a program function receives) and ProgramStateGroup (what `fork` returns)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from radixrt.lang import ir
from radixrt.lang.interpreter import StreamExecutor


class ProgramState:
    """`s += text | expr`, `s["name"]`, roles, `var_scope`, `fork`, `text()`, `messages()`."""

    def __init__(self, stream_executor: StreamExecutor) -> None:
        self.stream_executor = stream_executor
        self.ret_value: Any = None

    # ----- appending ---------------------------------------------------------------------

    def __iadd__(self, other: ir.Expr | str) -> "ProgramState":
        if other is None:
            raise ValueError("cannot append None to a program state")
        self.stream_executor.submit(other)
        return self

    def _role(self, role: str, expr: ir.Expr | str | None):
        """`s.user("hi")` appends a whole block; `with s.user():` opens one around the body."""
        if expr is not None:
            block = ir.ExprList([ir.RoleBegin(role), ir.as_expr(expr), ir.RoleEnd(role)])
            self.stream_executor.submit(block)
            return block

        @contextmanager
        def scope():
            self.stream_executor.submit(ir.RoleBegin(role))
            yield
            self.stream_executor.submit(ir.RoleEnd(role))

        return scope()

    def system(self, expr: ir.Expr | str | None = None):
        return self._role("system", expr)

    def user(self, expr: ir.Expr | str | None = None):
        return self._role("user", expr)

    def assistant(self, expr: ir.Expr | str | None = None):
        return self._role("assistant", expr)

    @contextmanager
    def var_scope(self, name: str):
        """Everything appended inside the block becomes variable `name`."""
        self.stream_executor.submit(ir.VarScopeBegin(name))
        yield
        self.stream_executor.submit(ir.VarScopeEnd(name))

    # ----- branching ---------------------------------------------------------------------

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> "ProgramStateGroup":
        return ProgramStateGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    @contextmanager
    def copy(self, position_ids_offset: Any = None):
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    # ----- reading -----------------------------------------------------------------------

    def text(self) -> str:
        self.stream_executor.sync()
        return self.stream_executor.text_

    def messages(self) -> list[dict[str, str]]:
        self.stream_executor.sync()
        return list(self.stream_executor.messages_)

    def sync(self) -> None:
        self.stream_executor.sync()

    def error(self) -> BaseException | None:
        self.stream_executor.sync()
        return self.stream_executor.error_

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self.stream_executor.variables[name] = value

    def get_meta_info(self, name: str) -> Any:
        return self.stream_executor.get_meta_info(name)

    def __getitem__(self, name: str) -> Any:
        return self.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.set_var(name, value)

    def __contains__(self, name: str) -> bool:
        return name in self.stream_executor.variables

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """With `run(stream=True)`: yield the text (or one variable) piece by piece as it grows."""
        ex = self.stream_executor
        if not ex.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        if var_name is None:
            yield from _follow(ex.stream_text_event, lambda: ex.text_, lambda: ex.is_finished)
            return
        while var_name not in ex.stream_var_event:  # the program has not reached the gen yet
            if ex.is_finished:
                return
            ex.stream_text_event.wait(0.05)
            ex.stream_text_event.clear()
        done = ex.variable_event[var_name]
        yield from _follow(ex.stream_var_event[var_name], lambda: ex.variables.get(var_name, ""), done.is_set)

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False) -> AsyncIterator:
        """`text_iter` for asyncio code: the same pieces, each awaited on the loop's default executor,
        so waiting for the model never blocks the event loop. With `return_meta_data`, (piece,
        meta_info) pairs: the variable's meta info as it stood when the piece arrived (SGLang's)."""
        loop = asyncio.get_running_loop()
        pieces = self.text_iter(var_name)
        while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
            if return_meta_data:
                yield piece, self.stream_executor.meta_info.get(var_name) if var_name else None
            else:
                yield piece

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


def _follow(event, current: Callable[[], str], finished: Callable[[], bool]) -> Iterator[str]:
    """Yield what `current()` gained each time `event` fires, until `finished()`."""
    sent = 0
    while True:
        done = finished()  # read before the text, so the last piece is never missed
        event.wait(0.1)
        event.clear()
        text = current()
        if len(text) > sent:
            yield text[sent:]
            sent = len(text)
        if done:
            return


class ProgramStateGroup:
    """The branches of `s.fork(n)`: `forks += expr | [expr_i] | lambda i: expr_i`, then `join()`."""

    def __init__(self, states: list[ProgramState], src_state: ProgramState | None = None) -> None:
        self.states = states
        self.src_state = src_state

    def __iadd__(self, other: Any) -> "ProgramStateGroup":
        if callable(other):
            for i, state in enumerate(self.states):
                state += other(i)
        elif isinstance(other, (ir.Expr, str)):
            for state in self.states:
                state += other
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"got {len(other)} items for {len(self.states)} branches")
            for state, item in zip(self.states, other):
                state += item
        else:
            raise TypeError(f"cannot append {type(other).__name__} to forked states")
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for every branch. `gather_variable`: each variable a branch made becomes, in the
        parent, the list of its values by branch. `concate_and_append`: append each branch's
        new text to the parent, in order."""
        if mode == "gather_variable":
            parent = self.src_state.stream_executor
            parent.sync()
            before = set(parent.variables)
            for state in self.states:
                state.stream_executor.sync()
                for name, value in state.stream_executor.variables.items():
                    if name not in before:
                        parent.variables.setdefault(name, []).append(value)
        elif mode == "concate_and_append":
            self.src_state += ir.ConcatAndAppend(self.states)
            self.src_state.sync()
        else:
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append' (got {mode!r})")

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        if self.states[i] is not value:  # `forks[i] += ...` assigns the same state back
            raise ValueError("cannot replace a forked state")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)
