"""Each token's raw bytes, read from a local Hugging Face tokenizer (no model hub).

Grammars work on bytes; tokenizers store tokens in their own spelling. Two spellings cover the
Llama/Qwen/Mistral/SmolLM families:

    byte-level BPE (GPT-2 style)   "Ġthe" -> b" the"      every byte has a printable stand-in char
    sentencepiece + byte fallback  "▁the" -> b" the"      "<0x0A>" -> b"\\n"

Special tokens (BOS/EOS, chat markers) have no text: they map to None and are never allowed by
a grammar, except the stop tokens, which the matcher handles itself.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the stand-in char of each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, vocab_size: int | None = None) -> list[bytes | None]:
    """bytes of every token id in [0, vocab_size); None for special and padding ids."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder") or {})
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    n = vocab_size if vocab_size is not None else len(tokenizer)
    out: list[bytes | None] = [None] * n
    decoder = _byte_decoder()
    for piece, tid in tokenizer.get_vocab().items():
        if tid >= n or tid in special:
            continue
        if byte_level:
            try:
                out[tid] = bytes(decoder[c] for c in piece)
            except KeyError:  # an added non-special token spelled in plain text
                out[tid] = piece.encode()
        else:
            m = _BYTE_TOKEN.fullmatch(piece)
            out[tid] = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
    return out


def decode_complete_utf8(data: bytes) -> str:
    """Decode forced bytes, dropping an incomplete character at the end (not forced yet).
    '' if they start inside a character: that text cannot be expressed as a str."""
    for cut in range(min(3, len(data)) + 1):
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""
