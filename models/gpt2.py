"""GPT-2 of the GPT-2 study, from its configuration (random weights; nothing is downloaded).

Needs the `hf` extra (transformers). The model is built with eager attention and no KV cache: the
cache and SDPA attention break tracing (ONNX export, torch-pruning), and the wrapper returns the
logits tensor instead of a ModelOutput.
"""

from __future__ import annotations

import torch
from torch import nn

from deploykit.errors import UsageError
from deploykit.spec import InputSpec, register_model

VOCAB = 50257
PROMPT_TOKENS = 16


class CausalLM(nn.Module):
    """input_ids (batch, seq) -> next-token logits (batch, seq, vocab)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # transformers builds its causal mask with vmap, which torch.onnx cannot trace ("unordered_map::at");
        # a ready 4-D additive mask is used as given, and is plain tril/where arithmetic in the graph.
        length = input_ids.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        blocked = torch.tensor(torch.finfo(torch.float32).min, device=input_ids.device)
        mask = torch.where(allowed, torch.tensor(0.0, device=input_ids.device), blocked)[None, None]
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def build_gpt2(**config) -> CausalLM:
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise UsageError("GPT-2 models need transformers: pip install 'deploykit[hf]'") from None
    cfg = GPT2Config(use_cache=False, attn_implementation="eager", **config)
    return CausalLM(GPT2LMHeadModel(cfg))


def _prompt(batch: int, generator: torch.Generator) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, PROMPT_TOKENS), generator=generator),)


TOKENS = InputSpec("input_ids", ("batch", "sequence"), "int64", high=VOCAB)


@register_model("gpt2-small", inputs=[TOKENS], outputs=["logits"], sampler=_prompt, output_layers=["model.lm_head"])
def gpt2_small() -> nn.Module:
    """GPT-2 small (GPT-2 study): 12 layers, 12 heads, d_model 768, vocab 50257, 124,439,808 parameters."""
    return build_gpt2()
