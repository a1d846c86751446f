"""Why a grammar could not be used: the message names the request field; `http_status` says how
the server answers it.

    GrammarError        400  invalid spec, or a feature the engine cannot honor
    GrammarTooLarge     413  over a size limit (limits.py): refused before any work
    GrammarTimeout      408  compiling took longer than the time budget
    GrammarUnavailable  400  the grammar engine could not be set up (no request can be constrained)

Separate from base.py so the torch-free preparation code (schema.py, prepare.py) and the
preparation processes can raise them without importing the engine interface.
"""

from __future__ import annotations


class GrammarError(ValueError):
    """An invalid spec, or a feature the backend cannot honor. The message names the feature."""

    http_status = 400


class GrammarTooLarge(GrammarError):
    """The spec exceeds a size limit; the message names the field, the limit and where."""

    http_status = 413


class GrammarTimeout(GrammarError):
    """Compiling the spec took longer than the time budget; its process was killed."""

    http_status = 408


class GrammarUnavailable(RuntimeError):
    """The grammar engine failed to start (e.g. it cannot read this model's tokenizer); unconstrained
    requests are unaffected. A 400, not a 503: retrying does not help, the request must drop its constraint."""

    http_status = 400


def one_line(exc: BaseException) -> str:
    """An engine's message on one line, without xgrammar's "[time] /path/file.cc:123: " prefix."""
    lines = []
    for line in (str(exc).strip() or type(exc).__name__).splitlines():
        if line.startswith("[") and ".cc:" in line:
            line = line.split(": ", 1)[-1]
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)[:400]
