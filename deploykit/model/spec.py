"""Model specifications: how to build a model and its example inputs, by name.

A `ModelSpec` is the one protocol every model source follows (the built-in zoo in `deploykit/model/zoo/`,
a user's entry point, a Hugging Face or ESPnet directory): a zero-argument `build` that returns an `nn.Module`, the model's inputs described as
`InputSpec`s (which also give ONNX its names and dynamic axes), and the names of its outputs.

How to add a model to the zoo: write a builder in a module under `deploykit/model/zoo/`, decorate it with
`@register_model("name", inputs=[...], outputs=[...])` (any `ModelSpec` field may be given), and import
that module from `deploykit/model/zoo/__init__.py`. A model that is not one forward pass names its
`pipeline` (`deploykit.pipelines`).
The builder's docstring is the model's description; cite the shape it reproduces there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from deploykit.core.env import available_memory_bytes
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.core.fsutil import write_text_atomic
from deploykit.core.registry import Registry
from deploykit.core.storage import load_weights, save_weights
from deploykit.model.checkpoints import with_module_versions

if TYPE_CHECKING:  # torch is imported lazily so that `deploykit --help` stays instant
    import torch
    from torch import nn

    from deploykit.model.hints import PruningHints
    from deploykit.model.training import Recipe

#: dtype names accepted in InputSpec, mapped to torch dtype attribute names
INPUT_DTYPES = ("float32", "float16", "int64", "int32")
#: bytes per element of each of those
INPUT_ITEMSIZE = {"float32": 4, "float16": 2, "int64": 8, "int32": 4}
#: the largest exclusive bound an integer input's values may have: its dtype's largest value + 1
INT_HIGH = {"int64": 2**63 - 1, "int32": 2**31}
#: the largest fixed size of an input axis that is checked further (a larger one fits no int64; below it,
#: the memory check refuses what would not fit)
MAX_DIM = 2**62
#: batch size of the example inputs models are traced with (ONNX export, dependency graphs)
TRACE_BATCH = 2
#: size of named non-batch axes (sequence, frames) in example inputs when the model has no sampler
DEFAULT_LENGTH = 16


@dataclass(frozen=True)
class InputSpec:
    """One model input. `shape` holds ints for fixed sizes and strings for named dynamic axes."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    #: exclusive upper bound of sampled values for integer inputs (token ids, class ids)
    high: int | None = None
    #: what the input holds instead of random data (`--input-value`, VALUE_FORMS): "16000", "ones",
    #: "zeros", "arange" / "arange:AXIS", "int:LOW:HIGH"; a sample rate, an attention mask, positions
    values: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in INPUT_DTYPES:
            raise ValueError(f"input {self.name!r}: dtype {self.dtype!r} not in {INPUT_DTYPES}")
        if self.values is not None:
            _check_values(self)
        if self.dtype.startswith("int") and self.high is None and self.values is None:
            raise ValueError(f"integer input {self.name!r} needs `high` (exclusive upper bound)")
        if self.high is not None and (type(self.high) is not int or not 1 <= self.high <= INT_HIGH[self.dtype]):
            raise ValueError(f"input {self.name!r}: HIGH (the exclusive upper bound of its values) must be an integer "
                             f"in [1, {INT_HIGH.get(self.dtype, 0):,}] for {self.dtype}, got {self.high!r}")
        for dim in self.shape:
            if not (isinstance(dim, str) and dim) and not (type(dim) is int and 1 <= dim <= MAX_DIM):
                raise ValueError(f"input {self.name!r}: axis {dim!r} is neither a size in [1, {MAX_DIM:,}] nor a name")

    def concrete_shape(self, batch_size: int, length: int | None = None) -> tuple[int, ...]:
        """The shape with the "batch" axis set to `batch_size` and every other named axis to `length`."""
        out = []
        for dim in self.shape:
            if dim == "batch":
                out.append(batch_size)
            elif isinstance(dim, str):
                if length is None:
                    raise ValueError(f"input {self.name!r}: no size given for dynamic axis {dim!r}")
                out.append(length)
            else:
                out.append(dim)
        return tuple(out)

    def nbytes(self, batch_size: int, length: int | None = None) -> int:
        """Bytes of one array of this input at `batch_size` (named axes at `length`, else DEFAULT_LENGTH)."""
        size = INPUT_ITEMSIZE[self.dtype]
        for dim in self.concrete_shape(batch_size, length or DEFAULT_LENGTH):
            size *= dim
        return size

    @property
    def sequence_axes(self) -> tuple[str, ...]:
        """Named axes other than the batch: what a sequence-length sweep sets."""
        return tuple(dim for dim in self.shape if isinstance(dim, str) and dim != "batch")

    def dynamic_axes(self) -> dict[int, str]:
        return {i: dim for i, dim in enumerate(self.shape) if isinstance(dim, str)}

    @classmethod
    def parse(cls, text: str) -> "InputSpec":
        """An input from `NAME:SHAPE[:DTYPE[:HIGH]]`, SHAPE comma-separated sizes or axis names:
        `x:batch,3,32,32`, `tokens:batch,seq:int64:1000` (token ids in [0, 1000)). The axis named
        "batch" follows --batch; other names follow --seq-len."""

        parts = text.split(":")
        if not 2 <= len(parts) <= 4 or not parts[0]:
            raise UsageError(f"input spec {text!r}: expected NAME:SHAPE[:DTYPE[:HIGH]], e.g. x:batch,3,32,32 or "
                             "tokens:batch,seq:int64:1000")
        name, shape_text, dtype, high = parts[0], parts[1], *(parts[2:] + [None, None])[:2]
        # an empty SHAPE is a scalar (sr::int64:16001)
        shape = tuple(_parse_dim(text, dim.strip()) for dim in shape_text.split(",")) if shape_text else ()
        if high is not None and not (high.isascii() and high.isdigit()):
            raise UsageError(f"input spec {text!r}: HIGH must be a positive integer (the exclusive upper bound "
                             f"of the values), got {high!r}")
        try:
            return cls(name, shape, dtype or "float32", int(high) if high else None)
        except ValueError as exc:
            raise UsageError(f"input spec {text!r}: {exc}") from None


#: the forms of `--input-value NAME=VALUE`
VALUE_FORMS = ("a number (every element, e.g. a sample rate: sr=16000), ones, zeros, arange (0, 1, ... along the "
               "last axis; arange:AXIS along another), int:LOW:HIGH (random integers in [LOW, HIGH))")
_NUMBER = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")
_ARANGE = re.compile(r"^arange(:(?P<axis>-?\d+))?$")
_INT_RANGE = re.compile(r"^int:(?P<low>-?\d+):(?P<high>-?\d+)$")


def _check_values(spec: InputSpec) -> None:
    """Refuse `spec.values` that is no VALUE_FORMS form, or does not fit the input's dtype or rank."""
    text, integer = spec.values, spec.dtype.startswith("int")
    if not isinstance(text, str):
        raise ValueError(f"input {spec.name!r}: values must be text, got {type(text).__name__}")
    if text in ("ones", "zeros"):
        return
    if _NUMBER.match(text):
        if integer and not re.match(r"^-?\d+$", text):
            raise ValueError(f"input {spec.name!r} is {spec.dtype}; value {text!r} is not an integer")
        if integer and not -INT_HIGH[spec.dtype] <= int(text) < INT_HIGH[spec.dtype]:
            raise ValueError(f"input {spec.name!r}: value {text} does not fit {spec.dtype}")
        return
    if match := _ARANGE.match(text):
        axis = int(match["axis"] or -1)
        if not -len(spec.shape) <= axis < len(spec.shape):
            raise ValueError(f"input {spec.name!r} has {len(spec.shape)} axes; {text!r} names axis {axis}")
        return
    if match := _INT_RANGE.match(text):
        if not integer:
            raise ValueError(f"input {spec.name!r} is {spec.dtype}; int:LOW:HIGH is for integer inputs")
        low, high = int(match["low"]), int(match["high"])
        if not -INT_HIGH[spec.dtype] <= low < high <= INT_HIGH[spec.dtype]:
            raise ValueError(f"input {spec.name!r}: {text!r} needs LOW < HIGH, both within {spec.dtype}")
        return
    raise ValueError(f"input {spec.name!r}: value {text!r} is not one of: {VALUE_FORMS}")


def with_value(spec: InputSpec, text: str) -> InputSpec:
    """`spec` holding `--input-value` `text`: refused in one line where it does not fit the input."""
    try:
        return replace(spec, values=text.strip())
    except ValueError as exc:
        raise UsageError(f"--input-value {spec.name}={text}: {exc}") from None


def parse_input_values(texts: Sequence[str]) -> dict[str, str]:
    """`--input-value NAME=VALUE` options -> {NAME: VALUE}; each input once."""
    values: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UsageError(f"--input-value {text!r}: expected NAME=VALUE, VALUE {VALUE_FORMS}")
        if name.strip() in values:
            raise UsageError(f"--input-value gives input {name.strip()!r} more than once")
        values[name.strip()] = value.strip()
    return values


def apply_input_values(inputs: Sequence[InputSpec], values: dict[str, str], model: str) -> tuple[InputSpec, ...]:
    """`inputs` with `values` (by input name) set; a name that is no input is refused, listing them."""
    unknown = sorted(set(values) - {spec.name for spec in inputs})
    if unknown:
        raise UsageError(f"--input-value names {', '.join(unknown)}, not an input of {model} (its inputs: "
                         f"{', '.join(spec.name for spec in inputs)})")
    return tuple(with_value(spec, values[spec.name]) if spec.name in values else spec for spec in inputs)


def value_array(spec: InputSpec, shape: tuple[int, ...], rng) -> "Any":
    """The numpy array `spec.values` makes at `shape`, random integers drawn from `rng` (numpy Generator)."""
    import numpy as np

    text = spec.values
    if text in ("ones", "zeros"):
        return (np.ones if text == "ones" else np.zeros)(shape, dtype=spec.dtype)
    if _NUMBER.match(text):
        return np.full(shape, int(text) if spec.dtype.startswith("int") else float(text), dtype=spec.dtype)
    if match := _ARANGE.match(text):
        axis = int(match["axis"] or -1) % max(len(shape), 1)
        if not shape:
            return np.zeros((), dtype=spec.dtype)
        line = np.arange(shape[axis], dtype=spec.dtype).reshape([-1 if i == axis else 1 for i in range(len(shape))])
        return np.broadcast_to(line, shape).copy()
    match = _INT_RANGE.match(text)
    return rng.integers(int(match["low"]), int(match["high"]), shape, dtype=spec.dtype)


def _parse_dim(text: str, dim: str) -> int | str:
    if dim.isascii() and dim.isdigit() and int(dim) > 0:  # "¹" is a digit to str.isdigit, not to int()
        return int(dim)
    if dim.isidentifier():
        return dim
    raise UsageError(f"input spec {text!r}: axis {dim!r} is neither a positive size nor a name")


Sampler = Callable[[int, "torch.Generator"], "tuple[torch.Tensor, ...]"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model and feed it."""

    name: str
    build: Callable[[], "nn.Module"]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    description: str = ""
    #: custom example-input sampler (batch_size, generator) -> tensors; default samples each InputSpec
    sampler: Sampler | None = None
    #: the sampler at a given length of the named axes (batch_size, generator, length) -> tensors, for
    #: models whose inputs are their task's data (a trained model fed noise measures nothing real);
    #: without it a length sweep samples each InputSpec
    length_sampler: "Callable[[int, torch.Generator, int], tuple[torch.Tensor, ...]] | None" = None
    #: seed for the random initialisation, so a model name always means the same weights
    seed: int = 0
    #: module names never pruned by default; empty means "detect the output layer"
    output_layers: tuple[str, ...] = field(default=())
    #: trains a freshly built model in place on data a package ships (deterministic for a seed)
    train: "Callable[[nn.Module], None] | None" = None
    #: quality of a model on held-out data, e.g. {"accuracy": 0.97}
    evaluate: "Callable[[nn.Module], dict[str, float]] | None" = None
    #: bump when `train` changes, so cached trained weights are not reused
    train_version: str = "1"
    #: how `train` trains (`deploykit.model.training.Recipe`): recorded in every export's manifest, and
    #: part of the cache key
    recipe: "Recipe | None" = None
    #: real inputs for static quantization's calibration and the pruners that run the model (wanda,
    #: sparsegpt, act-structured, `--recover`): n -> up to n input tuples (a batch each); without it,
    #: quantization uses example inputs, and those pruners refuse a user's model (`deploykit.model.calibration`)
    calibration: "Callable[[int], Sequence[tuple[torch.Tensor, ...]]] | None" = None
    #: the forms this model supports; None means all
    forms: tuple[str, ...] | None = None
    #: the pipeline that exports and runs it (`deploykit.pipelines`): "forward" (one graph, one call),
    #: "speech-translation" (an encoder/decoder pair decoded token by token), "text-generation"
    pipeline: str = "forward"
    #: the optional extra (`deploykit.core.extras`) whose packages building or exporting it needs; None: the core
    extra: str | None = None
    #: for models that are not in the zoo: (artifact directory, the model as shipped) -> writes what
    #: rebuilding the model needs into the directory and returns the manifest's `source` record (see
    #: `deploykit.model.sources`); None for zoo models, which are rebuilt by name
    bundle: "Callable[[Path, nn.Module], dict] | None" = None
    #: labelled batches for data-aware pruners (snip, grasp): n -> up to n (inputs tuple, targets)
    data: "Callable[[int], Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]]] | None" = None
    #: (outputs, targets) -> scalar loss for those pruners; None: cross-entropy on the (first) output
    loss: "Callable[[object, torch.Tensor], torch.Tensor] | None" = None
    #: what structured pruning and dense-shrunk need to know about layers they cannot read
    #: (`deploykit.model.hints`: custom layer handlers, layers whose width stays, attention blocks)
    pruning_hints: "PruningHints | None" = None

    def __post_init__(self) -> None:
        # sequences given as lists (by decorators, by users) are stored as tuples: a spec is hashable data
        for name in ("inputs", "outputs", "output_layers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.forms is not None:
            object.__setattr__(self, "forms", tuple(self.forms))

    def make(self, trained: bool = True) -> "nn.Module":
        """Build the model with its fixed seed, in eval mode; trained (from the cache) if it trains.

        `trained=False` gives the initial weights: what loading saved weights or rewinding starts from.
        """
        import torch

        from deploykit.core.parametrized import fold_parametrizations  # torch side

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self.build()
        if trained and self.train is not None:
            _load_or_train(self, model)
        if not isinstance(model, torch.jit.ScriptModule):
            # weight norm and other parametrizations, as plain weights: what pruning and shrinking need,
            # the same outputs; said in the export's notes (`FOLDED_ATTRIBUTE`)
            folded = fold_parametrizations(model)
            if folded:
                setattr(model, FOLDED_ATTRIBUTE, folded)
        return model.eval()

    def training_record(self, trained: "nn.Module | None") -> dict[str, Any]:
        """What the manifest says of a trained model's training: the recipe, and the trained model's
        quality before anything was pruned (kept beside the cached weights; `trained` is scored when
        that record is missing, and without it, pruning at initialisation, the result stays empty
        rather than a model being trained only to be scored). Empty for models that do not train."""
        if self.train is None:
            return {}
        cached = _read_training_record(self, _cache_path(self).with_suffix(".json"))
        return cached or _training_record(self, _quality(self, trained) if trained is not None else {})

    def cached_training(self) -> dict[str, Any] | None:
        """The record kept beside this model's cached trained weights (`train_seconds`: how long training took
        here), or None where it trains and nothing is cached yet, or it does not train."""
        if self.train is None:
            return None
        path = _cache_path(self)
        return (_read_training_record(self, path.with_suffix(".json")) or {}) if path.is_file() else None

    def example_inputs(self, batch_size: int = 1, seed: int = 0, length: int | None = None) -> "tuple[torch.Tensor, ...]":
        """Inputs for one call. `length` sets every named non-batch axis (sequence, frames, ...) for a
        sequence-length sweep; without it the model's sampler decides, else DEFAULT_LENGTH."""
        import torch

        check_input_memory(self.inputs, batch_size, length, self.name)

        generator = torch.Generator().manual_seed(seed)
        if length is not None:
            self.require_sequence_axis()
            if self.length_sampler is not None:
                return self._with_values(self.length_sampler(batch_size, generator, length), generator)
            return tuple(_sample(spec, batch_size, generator, length) for spec in self.inputs)
        if self.sampler is not None:
            return self._with_values(self.sampler(batch_size, generator), generator)
        length = DEFAULT_LENGTH if any(spec.sequence_axes for spec in self.inputs) else None
        return tuple(_sample(spec, batch_size, generator, length) for spec in self.inputs)

    def _with_values(self, tensors, generator) -> "tuple[torch.Tensor, ...]":
        """A sampler's tensors with the inputs that hold given values (`--input-value`) set to them."""
        tensors = tuple(tensors)
        if not any(spec.values is not None for spec in self.inputs) or len(tensors) != len(self.inputs):
            return tensors
        return tuple(_fill_like(spec, tensor, generator) if spec.values is not None else tensor
                     for spec, tensor in zip(self.inputs, tensors))

    def require_sequence_axis(self) -> None:
        """A sequence-length sweep needs a named non-batch input axis to set."""
        if not any(spec.sequence_axes for spec in self.inputs):
            shapes = ", ".join(f"{s.name} {tuple(s.shape)}" for s in self.inputs)
            raise UsageError(f"{self.name} has no sequence axis to set a length on (inputs: {shapes})")

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    def dynamic_axes(self, sequence: bool = True) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes: every named input axis (only "batch" with `sequence=False`); outputs
        share the batch axis at dim 0."""
        axes = {spec.name: {i: dim for i, dim in spec.dynamic_axes().items() if sequence or dim == "batch"}
                for spec in self.inputs}
        axes = {name: named for name, named in axes.items() if named}
        if any("batch" in spec.shape for spec in self.inputs):
            axes.update({name: {0: "batch"} for name in self.outputs})
        return axes


#: inputs may take at most this share of the memory available: the model's activations, its outputs
#: and the reference's copies need several times the inputs
INPUT_MEMORY_SHARE = 0.25


def check_input_memory(inputs: Sequence[InputSpec], batch_size: int, length: int | None, what: str) -> None:
    """Refuse, before anything is allocated, a batch size or length whose inputs alone would take more
    than INPUT_MEMORY_SHARE of the memory available now (a typo like --batch 1000000 would otherwise
    allocate until the kernel kills the process)."""

    needed = sum(spec.nbytes(batch_size, length) for spec in inputs)
    available = available_memory_bytes()
    if needed > INPUT_MEMORY_SHARE * available:
        shape = f"batch {batch_size}" + (f", length {length}" if length else "")
        raise UsageError(f"{what} at {shape} needs {needed / 2**30:.3g} GiB for its inputs alone, more than "
                         f"{INPUT_MEMORY_SHARE:.0%} of the {available / 2**30:.3g} GiB available: use a smaller "
                         "--batch or --seq-len")


def cache_dir() -> Path:
    """Where trained zoo weights are kept: $DEPLOYKIT_CACHE, else ~/.cache/deploykit."""
    return Path(os.environ.get("DEPLOYKIT_CACHE") or Path.home() / ".cache" / "deploykit")


def _load_or_train(spec: "ModelSpec", model: "nn.Module") -> None:
    """Load `spec`'s trained weights from the cache, training (and caching) them on a miss.

    The cache only saves time: training is seeded, so a miss reproduces the same model up to the
    float summation order of the machine's kernels.
    """
    import torch

    path = _cache_path(spec)
    if path.is_file():
        try:
            model.load_state_dict(with_module_versions(model, load_weights(path)))
            return
        except (ArtifactError, RuntimeError):
            pass  # a damaged or stale cache entry is retrained over
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        spec.train(model)
    model.eval()
    record = _training_record(spec, _quality(spec, model), time.perf_counter() - started)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_weights(model.state_dict(), path)
        write_text_atomic(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    except OSError:
        pass  # an unwritable cache costs time on the next run, not correctness


def _cache_path(spec: "ModelSpec") -> Path:
    """The cached weights of `spec`'s trained model: keyed by everything they depend on (the recipe, the
    training version, torch and Python releases: kernels and shipped data differ between them)."""
    import torch

    recipe = json.dumps(spec.recipe.record(), sort_keys=True) if spec.recipe is not None else ""
    python = ".".join(map(str, sys.version_info[:3]))
    text = f"{spec.name}:{spec.seed}:{spec.train_version}:{torch.__version__}:{python}:{recipe}"
    return cache_dir() / f"{spec.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.safetensors"


def _quality(spec: "ModelSpec", model: "nn.Module") -> dict[str, float]:
    return spec.evaluate(model) if spec.evaluate is not None else {}


def _training_record(spec: "ModelSpec", result: dict[str, float], seconds: float | None = None) -> dict[str, Any]:
    """The recipe, the trained model's quality, and the training time."""
    record: dict[str, Any] = {"recipe": spec.recipe.record() if spec.recipe is not None else None, "result": result}
    if seconds is not None:
        record["train_seconds"] = round(float(seconds), 1)
    return record


def _read_training_record(spec: "ModelSpec", path: Path) -> dict[str, Any] | None:
    """The record cached beside trained weights, rebuilt from the spec's recipe and the cached figures,
    or None when it is missing or not what we wrote (a damaged cache entry is scored again, not believed)."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    result = cached.get("result") if isinstance(cached, dict) else None
    if not isinstance(result, dict) or not all(isinstance(k, str) and type(v) in (int, float)
                                               for k, v in result.items()):
        return None
    seconds = cached.get("train_seconds")
    return _training_record(spec, result, seconds if type(seconds) in (int, float) else None)


def _fill_like(spec: InputSpec, tensor: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
    import numpy as np
    import torch

    seed = int(torch.randint(0, 2**31, (), generator=generator))
    return torch.from_numpy(value_array(spec, tuple(tensor.shape), np.random.default_rng(seed)))


def _sample(spec: InputSpec, batch_size: int, generator: "torch.Generator", length: int | None = None) -> "torch.Tensor":
    import torch

    shape = spec.concrete_shape(batch_size, length)
    dtype = getattr(torch, spec.dtype)
    if spec.values is not None:
        return _fill_like(spec, torch.empty(shape), generator)
    if spec.dtype.startswith("int"):
        return torch.randint(0, spec.high, shape, generator=generator, dtype=dtype)
    return torch.randn(shape, generator=generator).to(dtype)


#: the attribute `ModelSpec.make` leaves on a model whose parametrized weights it folded (their names)
FOLDED_ATTRIBUTE = "deploykit_folded_parametrizations"

MODELS: Registry[ModelSpec] = Registry("model")

#: what `deploykit export` and `deploykit bench` run without --model (in the zoo)
DEFAULT_MODEL = "mlp-sst2"


def register_model(name: str, **fields: Any) -> Callable[[Callable[[], "nn.Module"]], Callable[[], "nn.Module"]]:
    """Decorator registering a zero-argument model builder under `name`.

    `fields` are `ModelSpec`'s own (one definition of what a spec holds); the builder's docstring's
    first line is the description unless one is given.
    """

    def decorate(build: Callable[[], "nn.Module"]) -> Callable[[], "nn.Module"]:
        doc = (build.__doc__ or "").strip()
        description = fields.pop("description", doc.splitlines()[0] if doc else "")
        MODELS.add(name, ModelSpec(name=name, build=build, description=description, **fields))
        return build

    return decorate
