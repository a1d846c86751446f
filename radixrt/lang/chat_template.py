"""Role blocks (`s.user(...)`, `with s.assistant():`) as the text the model's chat template makes.

A program's text only ever grows, so that each call's prompt extends the last one and hits
the prefix cache. We therefore need each role as a fixed (prefix, suffix) pair around its
content. The model's Jinja template is not written that way, so we find the pairs by
rendering a few probe conversations with marker contents and cutting at the markers:

    render([user A])                      = preamble + user_prefix + A + user_suffix
    render([user A, assistant B])         = ...A + user_suffix + asst_prefix + B + asst_suffix
    render([user A, assistant B, user C]) = ...B + asst_suffix + user_prefix + C + ...
    render([system S, user A])            = system_prefix + S + system_suffix + user_prefix + A ...

The preamble (BOS, a default system prompt such as SmolLM2's) goes before the first message
when it is not a system message. A program built from role blocks thus has exactly the text
`tokenizer.apply_chat_template(s.messages())` would give.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_A, _B, _C, _S = "RDXMARKA7", "RDXMARKB7", "RDXMARKC7", "RDXMARKS7"


@dataclass
class ChatTemplate:
    roles: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    preamble: str = ""  # before a first message that is not a system message
    name: str = "custom"
    missing: dict[str, str] = field(default_factory=dict)  # role -> why the template cannot render it

    def prefix(self, role: str, first: bool) -> str:
        self._check(role)
        head = self.preamble if first and role != "system" else ""
        return head + self.roles[role][0]

    def suffix(self, role: str) -> str:
        self._check(role)
        return self.roles[role][1]

    def _check(self, role: str) -> None:
        if role in self.roles:
            return
        reason = self.missing.get(role, "it is not a known role (system, user, assistant)")
        raise ValueError(f"the chat template cannot render a {role!r} block: {reason}")


# SGLang's "default" template: for models without a chat template of their own.
DEFAULT = ChatTemplate(
    {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"), "assistant": ("ASSISTANT:", "\n")}, name="default"
)

CHATML = ChatTemplate(
    {
        "system": ("<|im_start|>system\n", "<|im_end|>\n"),
        "user": ("<|im_start|>user\n", "<|im_end|>\n"),
        "assistant": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    },
    name="chatml",
)


def from_tokenizer(tokenizer: Any) -> ChatTemplate:
    """Derive the role blocks from a Hugging Face tokenizer's chat template (DEFAULT if none)."""
    if not getattr(tokenizer, "chat_template", None):
        return DEFAULT

    def render(messages: list[tuple[str, str]], generation_prompt: bool = False) -> str:
        msgs = [{"role": r, "content": c} for r, c in messages]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    try:
        u = render([("user", _A)])
        ua = render([("user", _A), ("assistant", _B)])
        uau = render([("user", _A), ("assistant", _B), ("user", _C)])
        gen_prompt = render([("user", _A)], generation_prompt=True)[len(u) :]
    except Exception as exc:  # a template that rejects these probes: fall back rather than fail
        log.warning("cannot derive role blocks from the chat template (%s); using the default template", exc)
        return DEFAULT
    head, user_suffix = _around(u, _A)
    asst_suffix = _around(ua, _B)[1]
    between_ab = _between(ua, _A, _B)
    between_bc = _between(uau, _B, _C)
    if not (between_ab.startswith(user_suffix) and between_bc.startswith(asst_suffix)):
        log.warning("the chat template's role blocks are not fixed text; using the default template")
        return DEFAULT
    user_prefix = between_bc[len(asst_suffix) :]
    asst_prefix = between_ab[len(user_suffix) :]
    if gen_prompt and gen_prompt != asst_prefix:
        asst_prefix = gen_prompt  # what the model sees when it is asked to reply
    if not head.endswith(user_prefix):
        log.warning("the chat template's user block differs when first; using the default template")
        return DEFAULT
    roles = {"user": (user_prefix, user_suffix), "assistant": (asst_prefix, asst_suffix)}
    missing = {}
    try:
        su = render([("system", _S), ("user", _A)])
        between_sa = _between(su, _S, _A)
        if not between_sa.endswith(user_prefix):
            raise ValueError("the user block after a system message differs")
        roles["system"] = (su[: su.index(_S)], between_sa[: len(between_sa) - len(user_prefix)])
    except Exception as exc:
        missing["system"] = f"the model's template rejects system messages ({exc})"
    preamble = head[: len(head) - len(user_prefix)]
    return ChatTemplate(roles, preamble, name=getattr(tokenizer, "name_or_path", "custom") or "custom", missing=missing)


def _around(text: str, marker: str) -> tuple[str, str]:
    i = text.index(marker)
    return text[:i], text[i + len(marker) :]


def _between(text: str, a: str, b: str) -> str:
    return text[text.index(a) + len(a) : text.index(b)]
