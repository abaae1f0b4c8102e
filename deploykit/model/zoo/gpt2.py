"""GPT-2 of the GPT-2 study, from its configuration (random weights; nothing is downloaded).

Needs the `hf` extra (transformers, optimum). The model is built with eager attention and no KV
cache: the cache and SDPA attention break tracing (torch-pruning), and the wrapper returns the
logits tensor instead of a ModelOutput. Its ONNX form comes from optimum, with and without the
key/value cache (`deploykit.pipelines.hf_generation`), and artifacts run as the "text-generation" pipeline.

Its evaluation is perplexity on a fixed token sequence drawn from the model's own vocabulary: for
random weights that number is about the vocabulary size, and it exercises the path a trained model
and a real text would take.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from deploykit.core.extras import require
from deploykit.model.hf import CausalLM, causal_lm_fields
from deploykit.model.spec import register_model
from deploykit.model.training import Recipe, fit
from deploykit.model.zoo.corpus import (
    CORPUS,
    held_out_prompts,
    language_model_quality,
    next_token_loss,
    token_ids,
    training_windows,
    windows,
)

VOCAB = 50257


def build_gpt2(**config) -> CausalLM:
    transformers = require("transformers", "a GPT-2 model")
    cfg = transformers.GPT2Config(use_cache=False, attn_implementation="eager", **config)
    return CausalLM(transformers.GPT2LMHeadModel(cfg))


def _fields(vocab: int) -> dict:
    return dict(**causal_lm_fields(vocab), output_layers=["model.lm_head"])


@register_model("gpt2-small", **_fields(VOCAB))
def gpt2_small() -> nn.Module:
    """GPT-2 small (GPT-2 study): 12 layers, 12 heads, d_model 768, vocab 50257, 124,439,808 parameters."""
    return build_gpt2()


TINY_VOCAB = 1000


@register_model("gpt2-tiny", **_fields(TINY_VOCAB))
def gpt2_tiny() -> nn.Module:
    """GPT-2, tiny configuration for CI: 2 layers, 4 heads, d_model 64, vocab 1000, 180,480 parameters."""
    return build_gpt2(n_layer=2, n_head=4, n_embd=64, vocab_size=TINY_VOCAB, n_positions=256)


# -- trained on the Python language reference ---------------------------------------------------------

#: tokens per training window and per evaluation window
TRAINED_CONTEXT = 128


def _trained_fields(vocab: int, recipe: Recipe) -> dict:
    return dict(_fields(vocab), sampler=held_out_prompts(vocab), length_sampler=held_out_prompts(vocab, length=True),
                recipe=recipe, calibration=training_windows(vocab, TRAINED_CONTEXT),
                train=partial(_train_language_model, vocab=vocab, recipe=recipe),
                evaluate=partial(_quality, vocab=vocab))


def _train_language_model(model: nn.Module, *, vocab: int, recipe: Recipe, after_step=None) -> None:
    train = token_ids(vocab)[0]
    fit(model, recipe, lambda g: windows(train, recipe.batch, TRAINED_CONTEXT, g), next_token_loss, after_step)


def _quality(model: nn.Module, *, vocab: int) -> dict[str, float]:
    return language_model_quality(model, vocab, TRAINED_CONTEXT)


def _recipe(steps: int, batch: int, lr: float) -> Recipe:
    return Recipe(data=f"{CORPUS}; windows of {TRAINED_CONTEXT} tokens", steps=steps, batch=batch, lr=lr,
                  warmup=steps // 20, weight_decay=0.01)


@register_model("gpt2-tiny-trained", **_trained_fields(TINY_VOCAB, _recipe(steps=1500, batch=16, lr=3e-3)))
def gpt2_tiny_trained() -> nn.Module:
    """gpt2-tiny (2 layers, 4 heads, d_model 64, vocab 1000) trained on the Python language reference (about 3 minutes on 2 cores)."""
    return gpt2_tiny()


MINI_VOCAB = 4096


@register_model("gpt2-mini-trained", **_trained_fields(MINI_VOCAB, _recipe(steps=1000, batch=8, lr=1.5e-3)))
def gpt2_mini_trained() -> nn.Module:
    """GPT-2, 4 layers, 4 heads, d_model 256, vocab 4096, 4,273,664 parameters; trained on the Python language reference (about 6 minutes on 2 cores)."""
    return build_gpt2(n_layer=4, n_head=4, n_embd=256, vocab_size=MINI_VOCAB, n_positions=256)
