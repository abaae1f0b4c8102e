"""GPT-2 of the GPT-2 study, from its configuration (random weights; nothing is downloaded).

Needs the `hf` extra (transformers, optimum). The model is built with eager attention and no KV
cache: the cache and SDPA attention break tracing (torch-pruning), and the wrapper returns the
logits tensor instead of a ModelOutput. Its ONNX form comes from optimum, with and without the
key/value cache (`deploykit.pipelines.gpt2`), and artifacts run as the "text-generation" pipeline.

Its evaluation is perplexity on a fixed token sequence drawn from the model's own vocabulary: for
random weights that number is about the vocabulary size, and it exercises the path a trained model
and a real text would take.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from deploykit.core.confine import inside
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.fsutil import write_text_atomic
from deploykit.model.causal_lm import perplexity
from deploykit.model.spec import InputSpec, ModelSpec, register_model

VOCAB = 50257
PROMPT_TOKENS = 16
#: tokens of the sequence perplexity is measured on
EVAL_TOKENS = 128


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


def hf_model(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


class TorchCausalLM:
    """Greedy decoding with the PyTorch model and its key/value cache.

    The cache travels as tuples and is wrapped in a fresh `DynamicCache` per call: transformers
    extends a cache object in place, which would make a state usable only once.
    """

    def __init__(self, model: nn.Module, eos: int | None = None):
        self.model = hf_model(model).eval()
        self.eos = eos

    def _run(self, ids: torch.Tensor, past):
        from transformers import DynamicCache

        cache = DynamicCache.from_legacy_cache(past) if past is not None else DynamicCache()
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        legacy = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        return out.logits[0, -1].numpy(), legacy

    def prefill(self, prompt: np.ndarray):
        return self._run(torch.from_numpy(np.asarray(prompt, dtype=np.int64)), None)

    def step(self, token: int, state):
        return self._run(torch.tensor([[token]], dtype=torch.long), state)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def _perplexity(model: nn.Module) -> dict[str, float]:
    vocab = model.model.config.vocab_size
    tokens = torch.randint(0, vocab, (EVAL_TOKENS,), generator=torch.Generator().manual_seed(7)).tolist()
    return {"perplexity": perplexity(TorchCausalLM(model), tokens)}


def _fields(vocab: int) -> dict:
    def prompt(batch: int, generator: torch.Generator) -> tuple[torch.Tensor]:
        return (torch.randint(0, vocab, (batch, PROMPT_TOKENS), generator=generator),)

    return dict(inputs=[InputSpec("input_ids", ("batch", "sequence"), "int64", high=vocab)], outputs=["logits"],
                sampler=prompt, output_layers=["model.lm_head"], evaluate=_perplexity,
                pipeline="text-generation")


@register_model("gpt2-small", **_fields(VOCAB))
def gpt2_small() -> nn.Module:
    """GPT-2 small (GPT-2 study): 12 layers, 12 heads, d_model 768, vocab 50257, 124,439,808 parameters."""
    return build_gpt2()


TINY_VOCAB = 1000


@register_model("gpt2-tiny", **_fields(TINY_VOCAB))
def gpt2_tiny() -> nn.Module:
    """GPT-2, tiny configuration for CI: 2 layers, 4 heads, d_model 64, vocab 1000, 180,480 parameters."""
    return build_gpt2(n_layer=2, n_head=4, n_embd=64, vocab_size=TINY_VOCAB, n_positions=256)


# -- a local Hugging Face model directory ------------------------------------------------------------

#: the config an artifact exported from a local directory carries, to rebuild the model's shape
HF_CONFIG_FILE = "hf_config.json"


def is_hf_directory(path) -> bool:
    """A directory with a Hugging Face config.json (whether deploykit can run its architecture is
    checked when it is read)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def _spec_from_config(name: str, config, description: str, build, bundle=None) -> ModelSpec:
    return ModelSpec(name=name, build=build, description=description, bundle=bundle, **_fields(config.vocab_size))


def _read_config(path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != "gpt2":
        raise UsageError(f"{path}: model_type {config.model_type!r} is not supported; deploykit reads GPT-2 "
                         "directories (model_type 'gpt2')")
    config.use_cache, config._attn_implementation = False, "eager"  # as the zoo builds it (tracing)
    return config


def hf_directory_spec(path):
    """A spec for a local GPT-2 directory (config.json + weights), read without touching the network."""
    from transformers import GPT2LMHeadModel

    path = Path(path)
    config = _read_config(path)

    def build() -> nn.Module:
        try:
            model = GPT2LMHeadModel.from_pretrained(str(path), config=config, local_files_only=True)
        except OSError as exc:
            raise UsageError(f"{path}: cannot load the weights: {str(exc).splitlines()[0]}") from None
        return CausalLM(model)

    def bundle(directory) -> dict:
        write_text_atomic(Path(directory) / HF_CONFIG_FILE, config.to_json_string())
        return {"kind": "hf-directory", "config": HF_CONFIG_FILE, "from": str(path)}

    return _spec_from_config(path.name, config, f"Hugging Face GPT-2 directory {path}", build, bundle)


def hf_spec_from_artifact(directory, manifest):
    """The spec of an artifact exported from a local directory: its shape from the config it carries
    (the weights come from the artifact)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config_path = inside(Path(directory), manifest.source.get("config"), "manifest source.config")
    try:
        config = GPT2Config.from_json_file(str(config_path))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read the GPT-2 config {str(config_path)!r}: {exc}") from None
    config.use_cache, config._attn_implementation = False, "eager"
    return _spec_from_config(manifest.model, config, f"exported from {manifest.source['from']}",
                             lambda: CausalLM(GPT2LMHeadModel(config)))
