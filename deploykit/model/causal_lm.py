"""What a causal language model is asked, whatever runs it: greedy tokens after a prompt, and the
perplexity of a token sequence.

Both take any model with `prefill(prompt) -> (logits, state)`, `step(token, state) -> (logits, state)`
and `logits(ids)`: the PyTorch wrappers (`deploykit.model.hf.TorchCausalLM`, `TorchSeq2SeqLM`) and the
onnxruntime one of the text-generation pipeline (`deploykit.pipelines.textgen.OrtCausalLM`). numpy
only: a model's evaluation (model layer) and a benchmark session (pipelines) share them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def greedy(lm, prompt: Sequence[int], new_tokens: int, eos: int | None = None) -> list[int]:
    """Up to `new_tokens` argmax tokens after `prompt` (stopping after `eos`), with the model's cache."""
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
