"""Give `\\d`, `\\w` and `\\s` one meaning on every backend: ASCII, as in JSON Schema patterns.

JSON Schema patterns are ECMA-262 regexes, where `\\d` is `[0-9]`. The Rust engines
(llguidance, outlines-core) read `\\d` as any Unicode decimal digit, so `^\\d{5}$` could yield
"১४৩৫৬", which a JavaScript validator rejects (and Python's `re` may too, when its Unicode
tables are older). Rewriting the classes before compiling makes every backend agree:

    \\d -> [0-9]      \\w -> [0-9A-Za-z_]      \\s -> [ \\t\\n\\r\\f\\v]      (inside [...]: no brackets)
    \\D -> [^0-9]     \\W -> [^0-9A-Za-z_]     \\S -> [^ \\t\\n\\r\\f\\v]     (inside [...]: left alone)
"""

from __future__ import annotations

_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_", "s": " \\t\\n\\r\\f\\v"}


def ascii_classes(regex: str) -> str:
    out, i, in_class = [], 0, False
    while i < len(regex):
        ch = regex[i]
        if ch == "\\" and i + 1 < len(regex):
            nxt = regex[i + 1]
            if nxt in _CLASSES:
                out.append(_CLASSES[nxt] if in_class else f"[{_CLASSES[nxt]}]")
            elif nxt.lower() in _CLASSES and not in_class:
                out.append(f"[^{_CLASSES[nxt.lower()]}]")
            else:
                out.append(ch + nxt)
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
            out.append(ch)
            i += 1
            # a ']' right after '[' or '[^' is a literal member, not the end of the class
            for lead in ("^", "]"):
                if i < len(regex) and regex[i] == lead:
                    out.append(lead)
                    i += 1
            continue
        if ch == "]" and in_class:
            in_class = False
        out.append(ch)
        i += 1
    return "".join(out)

