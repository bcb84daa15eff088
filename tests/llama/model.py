"""A tiny llama-architecture GGUF that the real llama.cpp server loads: random weights, nonsense, real bytes.

Random weights (fixed seed) with one piece of steering, so that a generation ends on its own after a few
tokens at any temperature (OpenCode sends no ``max_tokens``; a random model would run to the context's
end). The blocks' weights are small, so the hidden state that reaches the output layer is, to a close
approximation, the normalized embedding of the current token; the output rows are built from those
embeddings so that each token's most likely successor is a chosen one. Word pieces are laid out in short
chains whose last link is ``</s>``; after any other token, any piece is about as likely. Dimension 0 of every embedding
is a constant that the output layer reads as a bias, pushing byte-fallback and control tokens far down
(no stray bytes that would be invalid UTF-8, no ``<s>`` in the middle of an answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

ARCH = "llama"
EMBED = 64
BLOCKS = 2
HEADS = 4
HEADS_KV = 4
FEED_FORWARD = 128
CONTEXT = 32768
RMS_EPS = 1e-5
SEED = 20240609

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
SPACE = "\u2581"  # SentencePiece's word-boundary mark

# Words whose every "▁"-prefixed prefix becomes a piece, so SentencePiece-style merges reach the whole word.
WORDS = ("the", "and", "of", "to", "in", "is", "it", "you", "that", "hello", "world", "code", "cube", "model", "say")
CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,:!?'\n"

# Chat template (Jinja, what llama-cpp-python renders): plain "role: content" lines.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

CHAIN_LENGTH = 6  # word pieces a greedy generation emits before </s>
BIAS = 3.0  # dimension 0 of every embedding: the constant the output layer reads as a per-token bias
SUPPRESS = -12.0  # weight on that dimension for byte-fallback and control tokens (logit ≈ -34)
FIM_TOKENS = ("<PRE>", "<SUF>", "<MID>")  # CodeLlama-style infill markers, so `suffix` means something


@dataclass(frozen=True)
class Vocabulary:
    tokens: list[str]
    scores: list[float]
    types: list[int]

    def id_of(self, token: str) -> int:
        return self.tokens.index(token)


def build_vocabulary() -> Vocabulary:
    """<unk>, <s>, </s>, the 256 byte tokens, characters and word pieces, then the FIM markers (~350)."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces: list[str] = [SPACE, *CHARACTERS]
    for word in WORDS:
        piece = SPACE + word
        for end in range(2, len(piece) + 1):
            if piece[:end] not in pieces:
                pieces.append(piece[:end])
    tokens += pieces
    types += [gguf.TokenType.NORMAL] * len(pieces)
    tokens += list(FIM_TOKENS)
    types += [gguf.TokenType.CONTROL] * len(FIM_TOKENS)
    # Pieces score higher the longer they are, so SentencePiece merges prefer whole words.
    scores = [0.0 if t != gguf.TokenType.NORMAL else -1000.0 + len(tok) for tok, t in zip(tokens, types)]
    return Vocabulary(tokens=tokens, scores=scores, types=[int(t) for t in types])


def successors(vocab: Vocabulary) -> dict[int, int]:
    """The most likely next token after each word piece: chains of pieces ending in </s>.

    Other tokens get no successor of their own (after them any piece is about equally likely): giving them
    one would make a few rows sums of many embeddings, whose noise outweighs the chosen successor.
    """
    pieces = [i for i, t in enumerate(vocab.types) if t == gguf.TokenType.NORMAL]
    after: dict[int, int] = {}
    for position, token in enumerate(pieces):
        last_of_chain = position % CHAIN_LENGTH == CHAIN_LENGTH - 1 or position == len(pieces) - 1
        after[token] = EOS_ID if last_of_chain else pieces[position + 1]
    return after


def _random(rng: np.random.Generator, *shape: int, scale: float) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def build_tensors(vocab: Vocabulary) -> dict[str, np.ndarray]:
    """The llama tensors by GGUF name; numpy shapes are (rows, columns), the reverse of GGML's."""
    rng = np.random.default_rng(SEED)
    n_vocab = len(vocab.tokens)
    token_embd = _random(rng, n_vocab, EMBED, scale=1.0)
    token_embd[:, 0] = BIAS
    # Row j of the output layer is the sum of the embeddings of the tokens whose successor is j: the logit
    # of the chosen successor is then ≈ |embedding|² / 8 ≈ 8, that of any other token ≈ N(0, 1).
    output = np.zeros((n_vocab, EMBED), dtype=np.float32)
    for token, successor in successors(vocab).items():
        output[successor, 1:] += token_embd[token, 1:] / np.sqrt(EMBED)
    types = np.array(vocab.types)
    output[(types != gguf.TokenType.NORMAL) & (np.arange(n_vocab) != EOS_ID), 0] = SUPPRESS
    tensors = {
        "token_embd.weight": token_embd,
        "output_norm.weight": np.ones(EMBED, dtype=np.float32),
        "output.weight": output,
    }
    head_dim = EMBED // HEADS
    for block in range(BLOCKS):
        prefix = f"blk.{block}."
        tensors |= {
            prefix + "attn_norm.weight": np.ones(EMBED, dtype=np.float32),
            prefix + "attn_q.weight": _random(rng, HEADS * head_dim, EMBED, scale=0.02),
            prefix + "attn_k.weight": _random(rng, HEADS_KV * head_dim, EMBED, scale=0.02),
            prefix + "attn_v.weight": _random(rng, HEADS_KV * head_dim, EMBED, scale=0.02),
            prefix + "attn_output.weight": _random(rng, EMBED, HEADS * head_dim, scale=0.02),
            prefix + "ffn_norm.weight": np.ones(EMBED, dtype=np.float32),
            prefix + "ffn_gate.weight": _random(rng, FEED_FORWARD, EMBED, scale=0.02),
            prefix + "ffn_up.weight": _random(rng, FEED_FORWARD, EMBED, scale=0.02),
            prefix + "ffn_down.weight": _random(rng, EMBED, FEED_FORWARD, scale=0.02),
        }
    return tensors


def write_model(path: Path) -> Path:
    """Write the tiny model to ``path`` (the same bytes every time) and return it."""
    vocab = build_vocabulary()
    writer = gguf.GGUFWriter(path, ARCH)
    writer.add_name("cube-tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBED)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS_KV)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(EMBED // HEADS)
    writer.add_vocab_size(len(vocab.tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_pooling_type(gguf.PoolingType.MEAN)  # /v1/embeddings: one vector per input, not per token
    for key, token in zip(
        (gguf.Keys.Tokenizer.FIM_PRE_ID, gguf.Keys.Tokenizer.FIM_SUF_ID, gguf.Keys.Tokenizer.FIM_MID_ID), FIM_TOKENS
    ):
        writer.add_uint32(key, vocab.id_of(token))
    for name, array in build_tensors(vocab).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    import sys

    print(write_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama.gguf")))
