"""StreamExecutor: runs one program state's expressions, in order, off the caller's thread.

`s += expr` only queues `expr`; a short-lived thread drains the queue, so the program
function runs ahead until it reads a value (`s["answer"]`, `s.text()`), and the branches
of a `fork` (each its own executor) send their model calls at the same time, which the
engine batches. The state is text plus what the program learned along the way:

    text_       everything appended so far (the prompt of the next model call)
    messages_   the role blocks, as OpenAI-style messages
    variables   gen/select/var_scope results by name; readers wait on variable_event[name]

After an error the remaining expressions are skipped and every waiting reader is released;
`error_` holds the cause.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from typing import Any

from radixrt.lang import ir
from radixrt.lang.errors import ProgramError, VariableNotFoundError
from radixrt.server.reasoning import split

log = logging.getLogger(__name__)


class StreamExecutor:
    def __init__(
        self,
        backend,
        arguments: dict[str, Any],
        default_sampling_para: ir.SglSamplingParams,
        chat_template=None,
        stream: bool = False,
        use_thread: bool = True,
    ) -> None:
        self.sid = uuid.uuid4().hex
        self.backend = backend
        self.arguments = arguments
        self.default_sampling_para = default_sampling_para
        self.chat_template = chat_template or backend.get_chat_template()
        self.stream = stream
        self.use_thread = use_thread
        self.text_ = ""
        self.messages_: list[dict[str, str]] = []
        self.variables: dict[str, Any] = {}
        self.variable_event: dict[str, threading.Event] = {}
        self.meta_info: dict[str, Any] = {}
        self.cur_role: str | None = None
        self.cur_role_begin_pos: int | None = None
        self.fork_start_text_pos: int | None = None
        self.error_: BaseException | None = None
        self.is_finished = False
        self._scope_start: dict[str, int] = {}
        self._reasoning: dict[str, tuple[str, int]] = {}  # gen name -> (reasoning parser, where its text starts)
        self._pending: deque[ir.Expr] = deque()
        self._lock = threading.Lock()
        self._draining = False
        self._idle = threading.Event()
        self._idle.set()
        # Streaming: set whenever text (or a variable) grows, so text_iter can wake up.
        self.stream_text_event = threading.Event() if stream else None
        self.stream_var_event: dict[str, threading.Event] | None = {} if stream else None

    # ----- queue -------------------------------------------------------------------------

    def submit(self, expr: ir.Expr | str) -> None:
        expr = ir.as_expr(expr)
        for name in ir.named_exprs(expr):
            self.variable_event[name] = threading.Event()
            if self.stream_var_event is not None:
                self.stream_var_event[name] = threading.Event()
        if not self.use_thread:
            self._execute(expr)
            return
        with self._lock:
            self._pending.append(expr)
            self._idle.clear()
            if not self._draining:
                self._draining = True
                threading.Thread(target=self._drain, name=f"radixrt-program-{self.sid[:8]}", daemon=True).start()

    def sync(self) -> None:
        """Wait until every queued expression has run."""
        self._idle.wait()

    def end(self) -> None:
        self.submit(ir.EndOfProgram())

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._draining = False
                    self._idle.set()
                    return
                expr = self._pending.popleft()
            if self.error_ is None:
                try:
                    self._execute(expr)
                except Exception as exc:
                    self.fail(exc)
            if self.stream_text_event is not None:
                self.stream_text_event.set()

    def fail(self, exc: BaseException) -> None:
        """Record the program's error and release everyone waiting on it."""
        if self.error_ is None:
            log.warning("program failed: %r", exc)
            self.error_ = exc
        self.is_finished = True
        for event in self.variable_event.values():
            event.set()
        for event in (self.stream_var_event or {}).values():
            event.set()
        if self.stream_text_event is not None:
            self.stream_text_event.set()

    # ----- reading -----------------------------------------------------------------------

    def get_var(self, name: str) -> Any:
        event = self.variable_event.get(name)
        if event is not None:
            event.wait()
        if name in self.variables:
            return self.variables[name]
        if self.error_ is not None:
            message = f"variable {name!r} was never set: the program failed with {self.error_!r}"
            raise ProgramError(message) from self.error_
        known = ", ".join(repr(k) for k in self.variables) or "none yet"
        raise VariableNotFoundError(f"this program state has no variable {name!r} (it has: {known})")

    def get_meta_info(self, name: str) -> Any:
        event = self.variable_event.get(name)
        if event is not None:
            event.wait()
        return self.meta_info.get(name)

    def fork(self, size: int = 1) -> list["StreamExecutor"]:
        """Copies of this state that continue independently; the shared text is cached first."""
        size = int(size)
        if size < 1:
            raise ValueError(f"fork() needs a size >= 1 (got {size})")
        self.sync()
        if self.error_ is not None:
            raise ProgramError(f"cannot fork a failed program state: {self.error_!r}") from self.error_
        if not self.text_:
            raise ValueError("fork() needs text in the state first: the branches share it as their cached prefix")
        if size > 1:
            self.backend.cache_prefix(self.text_)
        children = []
        for _ in range(size):
            child = StreamExecutor(
                self.backend, self.arguments, self.default_sampling_para, self.chat_template, self.stream
            )
            child.text_ = self.text_
            child.messages_ = list(self.messages_)
            child.variables = dict(self.variables)
            child.cur_role, child.cur_role_begin_pos = self.cur_role, self.cur_role_begin_pos
            child.fork_start_text_pos = len(self.text_)
            children.append(child)
        return children

    # ----- execution ---------------------------------------------------------------------

    def _execute(self, expr: ir.Expr) -> None:
        if isinstance(expr, ir.Text):
            self.text_ += str(expr.value)
        elif isinstance(expr, ir.ExprList):
            for e in expr.exprs:
                self._execute(e)
        elif isinstance(expr, ir.Gen):
            if expr.separate_reasoning and expr.name is not None:
                self._reasoning[expr.name] = (expr.separate_reasoning, len(self.text_))
            self._execute_gen(expr)
        elif isinstance(expr, ir.Select):
            self._execute_select(expr)
        elif isinstance(expr, ir.RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, ir.RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, ir.VarScopeBegin):
            self._scope_start[expr.name] = len(self.text_)
        elif isinstance(expr, ir.VarScopeEnd):
            self._set(expr.name, self.text_[self._scope_start.pop(expr.name) :], None)
        elif isinstance(expr, ir.CachePrefix):
            self.backend.cache_prefix(self.text_)
        elif isinstance(expr, ir.ConcatAndAppend):
            for state in expr.states:
                branch = state.stream_executor
                branch.sync()
                self.text_ += branch.text_[branch.fork_start_text_pos :]
        elif isinstance(expr, ir.EndOfProgram):
            self.is_finished = True
        else:
            raise TypeError(f"unknown expression {expr!r}")

    def _execute_gen(self, expr: ir.Gen) -> None:
        if not self.text_:
            raise ValueError(f"gen({expr.name!r}) needs text before it to continue; the state is empty")
        params = self.default_sampling_para.override(expr.params)
        if not self.stream:
            text, meta = self.backend.generate(self, params)
            # n > 1: the variable holds the n samples (and their meta infos); the text goes on with the first
            self.text_ += text[0] if isinstance(text, list) else text
            self._set(expr.name, text, meta)
            return
        if params.n > 1:
            raise ValueError(f"gen({expr.name!r}, n={params.n}) cannot stream: run the program without stream=True")
        value = ""
        if expr.name is not None:
            self.variables[expr.name] = value
        for chunk, meta in self.backend.generate_stream(self, params):
            value += chunk
            self.text_ += chunk
            if expr.name is not None:
                self.variables[expr.name] = value
                self.meta_info[expr.name] = meta
                self.stream_var_event[expr.name].set()
            self.stream_text_event.set()
        self._set(expr.name, value, self.meta_info.get(expr.name))

    def _execute_select(self, expr: ir.Select) -> None:
        if not self.text_:
            raise ValueError(f"select({expr.name!r}) needs text before it to score the choices against")
        decision = self.backend.select(self, expr.choices, expr.temperature, expr.choices_method)
        self.text_ += decision.decision
        self._set(expr.name, decision.decision, decision.meta_info)

    def _set(self, name: str | None, value: Any, meta: Any) -> None:
        if name is None:
            return
        if name in self._reasoning:  # before the variable is readable
            value = self._separate_reasoning(name, value, meta)
        self.variables[name] = value
        self.meta_info[name] = meta
        self.variable_event.setdefault(name, threading.Event()).set()
        if self.stream_var_event is not None:
            self.stream_var_event.setdefault(name, threading.Event()).set()

    def _role_begin(self, role: str) -> None:
        if self.cur_role is not None:
            raise ValueError(
                f"cannot begin a {role!r} block inside the open {self.cur_role!r} block; roles do not nest"
            )
        self.text_ += self.chat_template.prefix(role, first=not self.messages_)
        self.cur_role, self.cur_role_begin_pos = role, len(self.text_)

    def _role_end(self, role: str) -> None:
        if self.cur_role != role:
            raise ValueError(f"{role}_end() without a matching {role}_begin() (open block: {self.cur_role!r})")
        content = self.text_[self.cur_role_begin_pos :]
        self.text_ += self.chat_template.suffix(role)
        self.messages_.append({"role": role, "content": content})
        self.cur_role = self.cur_role_begin_pos = None

    def _separate_reasoning(self, name: str, value: Any, meta: Any) -> Any:
        """gen(..., separate_reasoning=...): the thinking to `<name>_reasoning_content`; the
        variable and the state keep the answer (n samples: each split, the state goes on with the first)."""
        parser, start = self._reasoning.pop(name)
        parts = [split(parser, text) for text in (value if isinstance(value, list) else [value])]
        self.text_ = self.text_[:start] + parts[0][1]
        pick = (lambda i: [p[i] for p in parts]) if isinstance(value, list) else (lambda i: parts[0][i])
        self._set(ir.reasoning_name(name), pick(0), meta)
        return pick(1)
