"""Deterministic "model output" for the fakes: tokens, token counts and embedding vectors.

Nothing here imitates a real model; it only has to be stable (the same request gives the same answer, so a test
can predict it), varied (tokens differ from one another: some gateways cut streams of identical chunks) and cheap.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

#: Word pieces the default token sequences are drawn from (leading spaces, as real tokenizers' pieces have).
VOCABULARY = (
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", " A", " model",
    " answers", " every", " prompt", " with", " care", ",", " and", " then", " stops", " gateway", " token",
    " stream", " secure", " enclave", " relays", " bytes", " faithfully", "!", " Hello", " world",
)
DEFAULT_TOKEN_COUNT = 8
DEFAULT_EMBEDDING_DIM = 8


def digest_of(value: Any) -> bytes:
    """SHA-256 of a JSON value in a canonical form (key order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).digest()


def default_tokens(seed: Any, count: int = DEFAULT_TOKEN_COUNT) -> list[str]:
    """``count`` tokens chosen by the hash of ``seed``; consecutive tokens never repeat."""
    tokens: list[str] = []
    stream = b""
    block = 0
    while len(tokens) < count:
        if not stream:
            stream = hashlib.sha256(digest_of(seed) + block.to_bytes(4, "big")).digest()
            block += 1
        piece = VOCABULARY[stream[0] % len(VOCABULARY)]
        stream = stream[1:]
        if tokens and piece == tokens[-1]:
            continue
        tokens.append(piece)
    return tokens


def limit_tokens(tokens: list[str], max_tokens: Any) -> tuple[list[str], bool]:
    """(tokens cut to ``max_tokens``, whether the limit cut them): the ``finish_reason: length`` case."""
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 <= max_tokens < len(tokens):
        return tokens[:max_tokens], True
    return list(tokens), False


def text_of(value: Any) -> str:
    """All text in a prompt, a message list or OpenAI content parts (for counting prompt tokens)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(item) for item in value)
    if isinstance(value, dict):
        return " ".join(text_of(value.get(key)) for key in ("content", "text") if key in value)
    return ""


def count_prompt_tokens(value: Any) -> int:
    """A stable prompt token count: one per word, one per message, at least one."""
    words = len(text_of(value).split())
    messages = len(value) if isinstance(value, list) else 0
    return max(1, words + messages)


def embedding_for(item: Any, dim: int = DEFAULT_EMBEDDING_DIM, *, normalize: bool = False) -> list[float]:
    """A vector in [-1, 1]^dim derived from the input's hash (L2-normalized when ``normalize``)."""
    raw = b""
    block = 0
    while len(raw) < dim:
        raw += hashlib.sha256(digest_of(item) + block.to_bytes(4, "big")).digest()
        block += 1
    vector = [round(byte / 127.5 - 1.0, 6) for byte in raw[:dim]]
    if normalize:
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        vector = [round(v / norm, 6) for v in vector]
    return vector


def embedding_inputs(value: Any) -> list[Any] | None:
    """OpenAI/Ollama ``input``: a string, a list of strings, a token array or a list of token arrays."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [value]
        if all(isinstance(v, (str, list)) for v in value):
            return list(value)
    return None
