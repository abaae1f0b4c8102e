"""What a causal language model is asked, whatever runs it: greedy tokens after a prompt, and the
perplexity of a token sequence.

Both take any model with `prefill(prompt) -> (logits, state)`, `step(token, state) -> (logits, state)`
and `logits(ids)`: the PyTorch wrappers (`deploykit.model.hf.TorchCausalLM`, `TorchSeq2SeqLM`) and the
onnxruntime one of the text-generation pipeline (`deploykit.pipelines.textgen.OnnxCausalLM`). numpy
only: a model's evaluation (model layer) and a benchmark session (pipelines) share them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from deploykit.core.errors import UsageError


def room(lm, prompt_length: int) -> int | None:
    """How many tokens `lm` can decode after a prompt of `prompt_length`: its `max_positions` (None: no
    limit known) less the prompt where the prompt takes positions (a causal LM's; not an encoder's)."""
    limit = getattr(lm, "max_positions", None)
    if limit is None:
        return None
    left = limit - (prompt_length if getattr(lm, "prompt_takes_positions", True) else 0)
    if left < 1:
        raise UsageError(f"a prompt of {prompt_length} tokens leaves no room in the model's {limit} positions: "
                         "use a shorter --seq-len")
    return left


def greedy(lm, prompt: Sequence[int], new_tokens: int, eos: int | None = None) -> list[int]:
    """Up to `new_tokens` argmax tokens after `prompt` (stopping after `eos`, and where the model's
    positions end), with the model's cache."""
    left = room(lm, len(prompt))
    new_tokens = new_tokens if left is None else min(new_tokens, left)
    logits, state = lm.prefill(np.asarray([prompt], dtype=np.int64))
    tokens: list[int] = []
    for i in range(new_tokens):
        token = int(np.argmax(logits))
        tokens.append(token)
        if token == eos or i == new_tokens - 1:
            break
        logits, state = lm.step(token, state)
    return tokens


def perplexity(lm, tokens: Sequence[int]) -> float:
    """exp(mean negative log-likelihood of each token given those before it), from one full pass."""
    ids = np.asarray([tokens], dtype=np.int64)
    logits = np.asarray(lm.logits(ids), dtype=np.float64)[0, :-1]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nll = -log_probs[np.arange(len(tokens) - 1), ids[0, 1:]]
    return float(np.exp(nll.mean()))


def scores_sequences(lm) -> bool:
    """Whether `lm` scores a whole token sequence in one pass (`logits(ids)`) with the prompt in it: a
    causal LM; an encoder-decoder's decoder cannot be called that way."""
    return callable(getattr(lm, "logits", None)) and getattr(lm, "prompt_takes_positions", True)


def next_token_agreement(lm, prompt: Sequence[int], tokens: Sequence[int]) -> float:
    """Share of `tokens` (another model's greedy continuation of `prompt`) that are `lm`'s own argmax after
    the same prefix, from one full pass: agreement per token. Free-running greedy agreement compares two
    continuations, and one near-tie that flips makes every later token differ: a model that picks
    another token once in a hundred agrees on about half of a 64-token continuation."""
    if not tokens:
        return 1.0
    ids = np.asarray([[*prompt, *tokens]], dtype=np.int64)
    logits = np.asarray(lm.logits(ids))[0, len(prompt) - 1:-1]
    return float((logits.argmax(axis=-1) == np.asarray(tokens)).mean())
