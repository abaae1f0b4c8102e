"""A local Hugging Face model directory as a model source: config.json and weights, read offline.

What the directory is comes from optimum's task table (`TasksManager`), not from a list of our own:
the config's `architectures` (the class it was saved from) names the task, restricted to the tasks
optimum can export for that `model_type` (BART's `BartForConditionalGeneration` is listed under both
fill-mask and text2text-generation; only the second exports), or the user names it (`--task`).
The task gives the model class (optimum's `AutoModel*` for it) and the pipeline:

- `text-generation` (decoder-only: GPT-2, Llama, ...) -> "text-generation", two graphs with and
  without the key/value cache;
- `text2text-generation` (encoder-decoder: T5, BART, ...) -> "text2text-generation", an encoder and
  a decoder with and without its cache;
- one-graph tasks (feature-extraction, text/token classification, image classification, ...) ->
  "optimum-forward": one graph, exported by optimum's `OnnxConfig` for the architecture, fed the
  dummy inputs that config generates (the inputs optimum validates its exports with).

Nothing here runs code the directory names: configs whose model type transformers does not know
(custom code, `auto_map`) are refused, and weights load with `local_files_only`. Models load with
eager attention and no cache, which tracing (torch-pruning, parity) needs; the exporters switch the
cache on where a graph has one. Each model is wrapped so that PyTorch calls it with positional
tensors in the graph's input order and gets the graph's outputs back (`HFModel`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from deploykit.core.confine import inside, read_json
from deploykit.core.env import available_memory_bytes
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.extras import require
from deploykit.core.fsutil import write_text_atomic
from deploykit.core.outputs import host_array
from deploykit.core.storage import check_safetensors
from deploykit.model.causal_lm import perplexity
from deploykit.model.spec import DEFAULT_LENGTH, InputSpec, ModelSpec

#: the config an artifact exported from a local directory carries, to rebuild the model's shape
HF_CONFIG_FILE = "hf_config.json"
CAUSAL_TASK, SEQ2SEQ_TASK = "text-generation", "text2text-generation"
#: tasks whose optimum export is one graph called once (the "optimum-forward" pipeline)
ONE_GRAPH_TASKS = ("feature-extraction", "fill-mask", "text-classification", "token-classification",
                   "question-answering", "multiple-choice", "image-classification", "masked-im",
                   "semantic-segmentation", "audio-classification")
#: task -> pipeline (`deploykit.pipelines`)
TASK_PIPELINES = {CAUSAL_TASK: "text-generation", SEQ2SEQ_TASK: "text2text-generation",
                  **{task: "optimum-forward" for task in ONE_GRAPH_TASKS}}
#: integer inputs whose values are token ids (the vocabulary bounds them); others are masks and
#: segment ids (0/1)
TOKEN_INPUTS = ("input_ids", "decoder_input_ids")


def _need_hf():
    require("transformers", "a Hugging Face model")
    # importing it registers optimum's ONNX configs
    require("optimum.exporters.onnx.model_configs", "a Hugging Face model")
    return require("optimum.exporters.tasks", "a Hugging Face model").TasksManager


#: index files transformers reads to find sharded weights; each names files in its weight_map
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: entries a model directory may hold (it holds tens); past this it is refused, not walked for minutes
MAX_DIRECTORY_ENTRIES = 10_000
#: the largest config.json or index read (real ones are kilobytes; an index of 10^5 shards is ~10 MB)
MAX_JSON_BYTES = 32 * 2**20
#: config values that size a transformer's layers (`check_config_values`): each, where given, a positive
#: integer, a list of them (one per stage: Swin's heads, SegFormer's) or a table of them (LXMERT's layers
#: per encoder), or null (transformers derives it: GPT-Neo's intermediate_size, ESM's vocab_size); none of
#: the config classes transformers ships is refused with its defaults (a test keeps it so). Sizes some architectures give as pairs
#: (image_size, patch_size) are left to transformers and the run-once check.
SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "num_hidden_layers", "n_layer", "num_layers", "n_layers",
             "encoder_layers", "decoder_layers", "num_decoder_layers", "num_attention_heads", "n_head", "num_heads",
             "n_heads", "encoder_attention_heads", "decoder_attention_heads", "num_key_value_heads", "vocab_size",
             "intermediate_size", "n_inner", "d_ff", "ffn_dim", "hidden_dim", "encoder_ffn_dim", "decoder_ffn_dim",
             "d_kv", "max_position_embeddings", "n_positions", "type_vocab_size")
#: sizes that may be 0 (DeBERTa has no token types)
ZERO_SIZES = ("type_vocab_size",)
#: layers a config may declare (the deepest released transformers have about 120; a config with more is
#: damaged or hostile, and would build for minutes before anything could refuse it)
MAX_LAYERS = 1024
#: the model's float32 weights may take at most this share of the memory available: pruning, the
#: converted copy, tracing and onnxruntime's session each hold another copy
MODEL_MEMORY_SHARE = 0.25


def confine_directory(path: Path) -> None:
    """Refuse a Hugging Face directory from which transformers would read a file outside it: a
    symbolic link anywhere in it that resolves outside, and a weights index whose `weight_map` names a
    path that is absolute or climbs out (`..`). Every safetensors file is opened by its header first,
    so a damaged one is refused naming it. All of it before transformers or safetensors reads a tensor."""
    root = path.resolve()
    entries = 0
    for folder, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            entries += 1
            if entries > MAX_DIRECTORY_ENTRIES:
                raise UsageError(f"{str(path)!r} holds more than {MAX_DIRECTORY_ENTRIES:,} entries; a Hugging Face "
                                 "model directory holds its config and weights")
            entry = Path(folder) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise ArtifactError(f"{str(path)!r}: {str(entry.relative_to(path))!r} is a symbolic link to "
                                    f"{os.readlink(entry)!r}, outside the directory; deploykit reads only files inside "
                                    "a Hugging Face directory (refused; copy it with `cp -rL` to take the files in)")
    weights = {p.name for p in path.glob("*.safetensors")}
    for index_name in WEIGHT_INDEX_FILES:
        if (path / index_name).exists():
            _check_json_size(path / index_name)
            index = read_json(path, index_name, index_name)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise ArtifactError(f"{str(path / index_name)!r}: weight_map must map tensor names to files")
            for key, value in weight_map.items():
                inside(path, value, f"{index_name} weight_map[{key!r}]")
                if index_name.startswith("model.safetensors"):
                    weights.add(value)
    for name in sorted(weights):
        if (path / name).is_file():
            check_safetensors(path / name)


def _check_json_size(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ArtifactError(f"{str(path)!r} is {path.stat().st_size:,} bytes; deploykit reads JSON files of up "
                                f"to {MAX_JSON_BYTES // 2**20} MB here")


def check_config_values(values: dict, where: str) -> None:
    """Refuse, naming the key, config values transformers would take and fail on later (or build for
    minutes from): sizes that are not positive integers, and quantized checkpoints."""
    for key in SIZE_KEYS:
        if key in values and not _size_value(values[key], 0 if key in ZERO_SIZES else 1):
            raise UsageError(f"{where}: config.json's {key} must be a positive integer (or a list or table of them, "
                             f"or null), got {values[key]!r:.80}")
    quantization = values.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise UsageError(f"{where}: config.json has a quantization_config ({method!r}); deploykit prunes and exports "
                         "float weights: give the float model's directory")


def _size_value(value, least: int) -> bool:
    if value is None or type(value) is int and value >= least:
        return True
    if isinstance(value, list):
        return bool(value) and all(type(v) is int and v >= least for v in value)
    if isinstance(value, dict):
        return all(type(v) is int and v >= least for v in value.values())
    return False


def estimated_parameters(config) -> int:
    """A lower bound of the parameters a transformers config describes, from its sizes alone (no
    tensor is made): embeddings, and per layer the attention's four projections and the MLP's two.
    transformers' attribute maps give every architecture these standard names."""
    hidden = _size(config, "hidden_size")
    ffn = next((v for v in (_size(config, n) for n in ("intermediate_size", "n_inner", "d_ff", "ffn_dim",
                                                           "encoder_ffn_dim")) if v), 4 * hidden)
    tokens = _size(config, "vocab_size") + _size(config, "max_position_embeddings")
    return tokens * hidden + layer_count(config) * (4 * hidden * hidden + 2 * hidden * ffn)


def layer_count(config) -> int:
    """The layers a config declares: its (encoder's) layers and its decoder's, where separate."""
    layers = _size(config, "num_hidden_layers")
    decoder = _size(config, "decoder_layers") or _size(config, "num_decoder_layers")
    return layers + decoder if config.is_encoder_decoder else layers


def _size(config, name: str) -> int:
    try:
        value = getattr(config, name, 0)
    except (AttributeError, TypeError):
        return 0
    return value if type(value) is int and value > 0 else 0


def check_config_size(config, where: str) -> None:
    """Refuse, before anything is allocated, a config whose model would not fit: more than MAX_LAYERS
    layers, or float32 weights beyond MODEL_MEMORY_SHARE of the memory available now (the estimate
    in the message)."""
    layers = layer_count(config)
    if layers > MAX_LAYERS:
        raise UsageError(f"{where}: config.json declares {layers:,} layers; deploykit builds models of up to "
                         f"{MAX_LAYERS:,} (a damaged or hostile config would build for minutes)")
    parameters = estimated_parameters(config)
    available = available_memory_bytes()
    if 4 * parameters > MODEL_MEMORY_SHARE * available:
        raise UsageError(f"{where}: config.json describes at least {parameters:,} parameters (estimated from its "
                         f"sizes: {4 * parameters / 2**30:.3g} GiB as float32), more than {MODEL_MEMORY_SHARE:.0%} "
                         f"of the {available / 2**30:.3g} GiB available; refused before building it")


def is_hf_directory(path) -> bool:
    """A directory with a Hugging Face config.json (whether deploykit can run it is checked when read)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def config_from_dict(values: dict, where: str):
    """A transformers config from its JSON values, by its `model_type` (never code the config names)."""
    _need_hf()
    from transformers import AutoConfig

    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise UsageError(f"{where}: config.json has no model_type")
    if values.get("auto_map"):
        raise UsageError(f"{where}: its config names custom code (auto_map), which deploykit does not run; "
                         "export it from an entry point (--model file.py:factory) instead")
    check_config_values(values, where)
    # an empty quantization_config says nothing, but transformers reads the key's presence as "quantized"
    values = {k: v for k, v in values.items() if k != "quantization_config" or v}
    try:
        config = AutoConfig.for_model(values["model_type"], **{k: v for k, v in values.items() if k != "model_type"})
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:  # a malformed config's
        raise UsageError(f"{where}: transformers cannot read model_type {values['model_type']!r} "
                         f"({(str(exc).splitlines() or [type(exc).__name__])[0][:160]})") from None
    check_config_size(config, where)
    config.use_cache, config._attn_implementation = False, "eager"  # tracing needs both
    try:  # JSON keys are strings; transformers' own from_dict makes these layer indices ints
        config.pruned_heads = {int(k): [int(h) for h in v] for k, v in dict(config.pruned_heads or {}).items()}
    except (TypeError, ValueError):
        raise UsageError(f"{where}: config.json's pruned_heads is malformed") from None
    return config


def read_config(path: Path):
    _check_json_size(Path(path) / "config.json")
    try:
        values = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: cannot read config.json ({str(exc)[:200] or type(exc).__name__})") from None
    return config_from_dict(values, str(path))


def exportable_tasks(model_type: str) -> list[str]:
    """The tasks optimum exports `model_type` for (without the "-with-past" variants)."""
    TasksManager = _need_hf()
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        return []
    return [task for task in tasks if not task.endswith("-with-past")]


def infer_task(config, requested: str | None = None, where: str = "") -> str:
    """The task to load and export `config`'s model for: `requested`, else the one its `architectures`
    name. Refused in one line where optimum cannot export it or deploykit has no pipeline for it."""
    TasksManager = _need_hf()
    exportable = [task for task in exportable_tasks(config.model_type) if task in TASK_PIPELINES]
    if not exportable:
        raise UsageError(f"{where}: optimum has no ONNX export for model_type {config.model_type!r} in a task "
                         f"deploykit runs ({', '.join(TASK_PIPELINES)})")
    if requested is not None:
        task = TasksManager.map_from_synonym(requested)
        if task not in exportable:
            raise UsageError(f"{where}: --task {requested} is not one deploykit can export for {config.model_type!r}; "
                             f"choose from {', '.join(exportable)}")
    else:
        # optimum keeps this table private; its public inference needs the Hub for local directories
        mappings = getattr(TasksManager, "_TRANSFORMERS_TASKS_TO_MODEL_MAPPINGS", {})
        architectures = config.architectures
        if architectures is not None and (not isinstance(architectures, (list, tuple))
                                          or not all(isinstance(a, str) for a in architectures)):
            raise UsageError(f"{where}: config.json's architectures must be a list of class names, got "
                             f"{architectures!r}"[:300])
        # a mapping's value is a class name or a tuple of them (DeiT's image classifiers)
        found = [task for arch in (config.architectures or []) for task, mapping in mappings.items()
                 if task in exportable and any(arch == v or (isinstance(v, tuple) and arch in v)
                                               for v in mapping.values())]
        if not found:
            raise UsageError(f"{where}: cannot tell the task from architectures {config.architectures}; give --task "
                             f"({', '.join(exportable)})")
        task = found[0]
    if config.is_encoder_decoder and task != SEQ2SEQ_TASK:
        raise UsageError(f"{where}: an encoder-decoder model runs as {SEQ2SEQ_TASK} in deploykit, not {task}")
    return task


def onnx_config(config, task: str):
    """optimum's ONNX export config of the architecture, for `task`."""
    TasksManager = _need_hf()
    constructor = TasksManager.get_exporter_config_constructor(
        "onnx", model_type=config.model_type, task=task, library_name="transformers")
    return constructor(config)


# -- the PyTorch side: wrappers called with positional tensors --------------------------------------


class HFModel(nn.Module):
    """A transformers model called with positional tensors (`input_names` order), returning the
    tensors `output_names` name: what tracing, parity and the forward pipeline's torch session need.
    `task` is what optimum exports it for."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_names: Sequence[str], task: str):
        super().__init__()
        self.model, self.input_names, self.output_names = model, tuple(input_names), tuple(output_names)
        self.task = task

    def forward(self, *inputs: torch.Tensor):
        out = self.model(**dict(zip(self.input_names, inputs)), **self.call_options)
        return out[self.output_names[0]] if len(self.output_names) == 1 else tuple(out[n] for n in self.output_names)

    #: keyword arguments of every call
    call_options: dict = {}


class CausalLM(HFModel):
    """input_ids (batch, seq) -> next-token logits (batch, seq, vocab), without the cache."""

    def __init__(self, model: nn.Module):
        super().__init__(model, ("input_ids",), ("logits",), CAUSAL_TASK)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # no mask: the model's own causal one (a 4-D one given here would be read as padding by models
        # that derive positions from the mask, OPT's); optimum's exporter, not a trace of this, makes the graphs
        return self.model(input_ids=input_ids, use_cache=False).logits


class Seq2SeqLM(HFModel):
    """(input_ids, decoder_input_ids) -> the decoder's logits, without the cache."""

    call_options = {"use_cache": False}

    def __init__(self, model: nn.Module):
        super().__init__(model, ("input_ids", "decoder_input_ids"), ("logits",), SEQ2SEQ_TASK)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside deploykit's wrapper (the model itself when it is not wrapped)."""
    return model.model if isinstance(model, HFModel) else model


def _state(cache) -> tuple:
    """A transformers cache as nested tuples of tensors, which can be stepped from more than once
    (transformers extends a cache object in place)."""
    return tuple(tuple(t for t in layer) for layer in cache.to_legacy_cache())


class TorchCausalLM:
    """Greedy decoding with a PyTorch causal LM and its key/value cache (the `deploykit.model.causal_lm`
    interface); the cache is rebuilt from tuples for each call (`_state`)."""

    def __init__(self, model: nn.Module, eos: int | None = None):
        self.model = hf_model(model).eval()
        self.eos = eos if eos is not None else self.model.config.eos_token_id
        self.max_positions = max_positions(self.model.config)
        self.vocab_size = self.model.config.vocab_size

    def _run(self, ids: torch.Tensor, past):
        from transformers import DynamicCache

        cache = DynamicCache.from_legacy_cache(past) if past is not None else DynamicCache()
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        return host_array(out.logits[0, -1]), _state(out.past_key_values)

    def prefill(self, prompt: np.ndarray):
        return self._run(torch.from_numpy(np.asarray(prompt, dtype=np.int64)), None)

    def step(self, token: int, state):
        return self._run(torch.tensor([[token]], dtype=torch.long), state)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return host_array(self.model(input_ids=torch.from_numpy(ids), use_cache=False).logits)


def decoder_start(config) -> int:
    """The token an encoder-decoder's decoding starts from: the config's `decoder_start_token_id`, else
    (mBART leaves it to its generation settings) its `bos_token_id`, else 0."""
    for value in (config.decoder_start_token_id, config.bos_token_id):
        if isinstance(value, int):
            return value
    return 0


class TorchSeq2SeqLM:
    """Greedy decoding with a PyTorch encoder-decoder: `prefill` encodes the source and runs the
    decoder's first step from its start token; `step` extends the decoder's cache."""

    def __init__(self, model: nn.Module):
        self.model = hf_model(model).eval()
        self.eos, self.start = self.model.config.eos_token_id, decoder_start(self.model.config)
        # the decoder's positions limit what it generates; the source is the encoder's
        self.max_positions, self.prompt_takes_positions = max_positions(self.model.config), False

    def _decode(self, token: int, past, **inputs):
        from transformers import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache.from_legacy_cache(past) if past else EncoderDecoderCache(DynamicCache(), DynamicCache())
        with torch.inference_mode():
            return self.model(**inputs, past_key_values=cache, use_cache=True,
                              decoder_input_ids=torch.tensor([[token]], dtype=torch.long))

    def prefill(self, prompt: np.ndarray):
        from transformers.modeling_outputs import BaseModelOutput

        ids = torch.from_numpy(np.asarray(prompt, dtype=np.int64))
        mask = torch.ones_like(ids)
        out = self._decode(self.start, None, input_ids=ids, attention_mask=mask)
        encoded = BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)
        return host_array(out.logits[0, -1]), (encoded, mask, _state(out.past_key_values))

    def step(self, token: int, state):
        encoded, mask, past = state
        out = self._decode(token, past, encoder_outputs=encoded, attention_mask=mask)
        return host_array(out.logits[0, -1]), (encoded, mask, _state(out.past_key_values))


# -- specs --------------------------------------------------------------------------------------------


#: tokens of the sequence a causal LM's perplexity is measured on
EVAL_TOKENS = 128


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover (None: relative positions, no limit)."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return positions if isinstance(positions, int) and positions > 1 else None


def causal_perplexity(model) -> dict[str, float]:
    """Perplexity on a fixed token sequence drawn from the model's own vocabulary: about the
    vocabulary size for random weights, and the path a trained model and a real text would take.
    `model`: the PyTorch model, or a stand-in that brings its own `causal_lm` (onnxruntime's graphs)."""
    lm = getattr(model, "causal_lm", None) or TorchCausalLM(model)
    length = min(EVAL_TOKENS, lm.max_positions or EVAL_TOKENS)  # a small config may have fewer positions
    tokens = torch.randint(0, lm.vocab_size, (length,), generator=torch.Generator().manual_seed(7)).tolist()
    return {"perplexity": perplexity(lm, tokens)}


def causal_lm_fields(vocab: int) -> dict:
    """The spec fields of a causal LM wrapped in `CausalLM`: prompts of DEFAULT_LENGTH tokens."""

    def prompt(batch: int, generator: torch.Generator) -> tuple[torch.Tensor]:
        return (torch.randint(0, vocab, (batch, DEFAULT_LENGTH), generator=generator),)

    return dict(inputs=[InputSpec("input_ids", ("batch", "sequence"), "int64", high=vocab)], outputs=["logits"],
                sampler=prompt, evaluate=causal_perplexity, pipeline="text-generation", extra="hf")


def _dummy_sampler(onnx, names: Sequence[str]):
    """Example inputs made by the dummy input generators of `onnx` (optimum's config of the
    architecture: what its export validation feeds), seeded from the generator deploykit passes, so a
    seed means the same inputs."""

    def sample(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        # optimum draws from torch's generator and Python's (the padding of its masks): both seeded, both restored
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                dummy = onnx.generate_dummy_inputs(framework="pt", batch_size=batch, sequence_length=DEFAULT_LENGTH)
        finally:
            random.setstate(state)
        return tuple(dummy[name] for name in names)

    return sample


def _int_bound(config, name: str) -> int:
    if name in TOKEN_INPUTS:
        return int(config.vocab_size)
    return int(getattr(config, "type_vocab_size", 2) or 2) if name == "token_type_ids" else 2


def _input_specs(config, onnx) -> tuple[InputSpec, ...]:
    """The graph's inputs as optimum's config `onnx` declares them: the batch axis and sequence axes
    named, other axes (channels, image size, choices) at the size its dummy inputs have."""
    dummy = onnx.generate_dummy_inputs(framework="pt", batch_size=2, sequence_length=DEFAULT_LENGTH)
    specs = []
    for name, axes in onnx.inputs.items():
        tensor = dummy[name]
        shape = tuple("batch" if axes.get(i) == "batch_size" else
                      "sequence" if "sequence" in str(axes.get(i, "")) else int(size)
                      for i, size in enumerate(tensor.shape))
        dtype = str(tensor.dtype).removeprefix("torch.")
        specs.append(InputSpec(name, shape, dtype, _int_bound(config, name) if dtype.startswith("int") else None))
    return tuple(specs)


def _spec(name: str, config, task: str, description: str, build, bundle=None) -> ModelSpec:
    """The spec of a transformers model of `config` for `task`, with `build` loading its weights."""
    fields: dict = dict(pipeline=TASK_PIPELINES[task])
    if task == CAUSAL_TASK:
        fields = causal_lm_fields(config.vocab_size)
        wrap = CausalLM
    elif task == SEQ2SEQ_TASK:
        inputs = tuple(InputSpec(n, ("batch", "sequence"), "int64", high=config.vocab_size) for n in TOKEN_INPUTS)
        fields.update(inputs=inputs, outputs=("logits",))
        wrap = Seq2SeqLM
    else:
        try:
            onnx = onnx_config(config, task)
            inputs = _input_specs(config, onnx)
            outputs = tuple(onnx.outputs)
        except Exception as exc:  # noqa: BLE001 - what optimum raises on config values it cannot describe
            raise UsageError(f"{description}: optimum cannot describe the inputs of the model its config describes "
                             f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})") from None
        fields.update(inputs=inputs, outputs=outputs, sampler=_dummy_sampler(onnx, [i.name for i in inputs]))

        def wrap(model, names=tuple(i.name for i in inputs)):
            return HFModel(model, names, outputs, task)

    spec = ModelSpec(name=name, build=lambda: wrap(build()), description=description, bundle=bundle, **fields)

    ran: list[bool] = []  # the config runs: later builds of the same spec need not call it again

    def checked_build() -> nn.Module:
        """The model, run once on its own example inputs (the first build of the spec): a config
        transformers builds from but cannot run (an activation of null, a size that does not divide) is the
        config's fault, said as such."""
        model = wrap(build())
        if ran:
            return model
        try:
            with torch.no_grad():
                model.eval()(*spec.example_inputs(1))
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever transformers raises on such a config
            raise UsageError(f"{description}: the model its config describes does not run ({type(exc).__name__}: "
                             f"{(str(exc).splitlines() or [''])[0][:200]})") from None
        ran.append(True)
        return model

    return dataclasses.replace(spec, build=checked_build)


def pruned_heads(model: nn.Module) -> dict[int, list[int]]:
    """The heads pruned in `model`'s attention modules, in transformers' config convention (layer index
    -> heads as numbered in the original model): the layer is the first index in the module's path
    (BERT's `encoder.layer.3.attention`, GPT-2's `transformer.h.3.attn`, T5's
    `encoder.block.3.layer.0.SelfAttention`). Where two modules with pruned heads share that index, the
    config cannot say which is which and says neither; the artifact's pruning history, which loading
    replays, still does."""
    found: dict[int, list[int]] = {}
    shared: set[int] = set()
    for name, module in model.named_modules():
        heads = getattr(module, "pruned_heads", None)
        indices = [int(part) for part in name.split(".") if part.isdigit()]
        if isinstance(heads, set) and heads and indices:
            if indices[0] in found:
                shared.add(indices[0])
            found[indices[0]] = sorted(int(h) for h in heads)
    return {layer: heads for layer, heads in found.items() if layer not in shared}


#: config values that size every layer's attention alike, which pruning the same number of heads in
#: every layer changes (`deploykit.prune.blocks.GroupedQueryHeads`)
HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads")


def head_counts(config) -> dict[str, int]:
    return {name: getattr(config, name) for name in HEAD_COUNTS if isinstance(getattr(config, name, None), int)}


def hf_directory_spec(path, task: str | None = None) -> ModelSpec:
    """A spec for a local Hugging Face directory (config.json + weights), read without the network."""
    path = Path(path)
    confine_directory(path)
    config = read_config(path)
    task = infer_task(config, task, str(path))
    model_class = _need_hf().get_model_class_for_task(task, framework="pt", library="transformers")

    def build() -> nn.Module:
        try:
            return model_class.from_pretrained(str(path), config=config, local_files_only=True,
                                               attn_implementation="eager")
        except (OSError, ValueError, RuntimeError) as exc:  # missing, unreadable, or not this config's shapes
            raise UsageError(f"{path}: cannot load the weights: {(str(exc).splitlines() or [''])[0][:200]}") from None
        except Exception as exc:  # noqa: BLE001 - what transformers raises on config values it cannot build from
            raise UsageError(f"{path}: transformers cannot build the model its config.json describes "
                             f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})") from None

    def bundle(directory, shipped: nn.Module) -> dict:
        written = copy.deepcopy(config)
        if callable(getattr(hf_model(shipped).base_model, "_prune_heads", None)):
            # a config whose model cannot prune heads as it is built (T5ForConditionalGeneration's) would no
            # longer load in transformers: there the artifact's pruning history alone says which went
            written.pruned_heads = {**written.pruned_heads, **pruned_heads(shipped)}
        shipped_config = hf_model(shipped).config
        counts = head_counts(shipped_config)
        for name, value in counts.items():  # heads pruned alike in every layer: the config's counts say so
            setattr(written, name, value)
        if counts != head_counts(config) and isinstance(getattr(shipped_config, "head_dim", None), int):
            written.head_dim = shipped_config.head_dim  # no longer hidden size / heads (Mistral, Qwen2 derive it)
        write_text_atomic(Path(directory) / HF_CONFIG_FILE, written.to_json_string())
        # the heads the directory's own config had: rebuilding starts from them, then replays deploykit's
        # pruning history
        return {"kind": "hf-directory", "config": HF_CONFIG_FILE, "task": task, "from": str(path),
                "pruned_heads_before": {str(k): sorted(v) for k, v in config.pruned_heads.items()},
                "head_counts_before": head_counts(config)}

    return _spec(path.name, config, task, f"Hugging Face {config.model_type} directory {path} ({task})", build, bundle)


def _heads_record(record, directory) -> dict[int, list[int]]:
    """{layer: heads} from a manifest's JSON record, checked (it is read from a file)."""
    try:
        heads = {int(layer): [int(h) for h in values] for layer, values in dict(record).items()}
    except (TypeError, ValueError):
        raise ArtifactError(f"{str(directory)!r}: the manifest's pruned_heads_before is malformed") from None
    if any(layer < 0 or any(h < 0 for h in values) for layer, values in heads.items()):
        raise ArtifactError(f"{str(directory)!r}: the manifest's pruned_heads_before has negative indices")
    return heads


def _counts_record(record, directory) -> dict[str, int]:
    """The head counts a manifest says the source had, checked (it is read from a file)."""
    if not isinstance(record, dict) or any(k not in HEAD_COUNTS or type(v) is not int or v <= 0
                                           for k, v in record.items()):
        raise ArtifactError(f"{str(directory)!r}: the manifest's head_counts_before is malformed")
    return record


def hf_spec_from_artifact(directory, manifest) -> ModelSpec:
    """The spec of an artifact exported from a local directory: its shape from the config it carries
    (the weights come from the artifact). Artifacts written before the task was recorded are GPT-2s."""
    values = read_json(Path(directory), manifest.source.get("config"), "manifest source.config")
    try:
        config = config_from_dict(values, f"{str(directory)!r} {HF_CONFIG_FILE}")
    except UsageError as exc:
        raise ArtifactError(str(exc)) from None
    # the config says which heads were pruned; loading replays the artifact's pruning history, which
    # removes deploykit's, so the model is built with only those the source directory had pruned
    config.pruned_heads = _heads_record(manifest.source.get("pruned_heads_before", {}), directory)
    for name, value in _counts_record(manifest.source.get("head_counts_before", {}), directory).items():
        setattr(config, name, value)  # the same for heads pruned in every layer, which set the config's counts
    task = manifest.source.get("task", CAUSAL_TASK)
    if task not in TASK_PIPELINES:
        raise ArtifactError(f"{str(directory)!r}: unknown Hugging Face task {task!r} in its manifest")
    model_class = _need_hf().get_model_class_for_task(task, framework="pt", library="transformers")
    return _spec(manifest.model, config, task, f"exported from {manifest.source.get('from')}",
                 lambda: model_class.from_config(config, attn_implementation="eager"))
