"""Calibration data: the inputs pruners that look at activations (wanda, sparsegpt, act-structured) and
recovery run the model on, one way for every model.

Where they come from, first match wins:

1. ``--calibration FILE``: an ``.npz`` or ``.safetensors`` file of input tensors named like the model's
   inputs, items along the first axis (all inputs the same count). Read without running anything
   (``allow_pickle=False``; safetensors has no code), its sizes checked before it is loaded, names,
   ranks, fixed axes, dtypes and integer ranges checked against the model's inputs. Or
   ``--calibration data.py:batches``: a function of the batch count returning batches (tuples of
   input tensors), as the spec hook does; code the user names on the command line, like ``--model
   file.py:build``, and its batches checked the same way.
2. ``--calibration random``: the model's example inputs (random unless it has a sampler). Allowed, but
   said: a warning in the manifest, since activation statistics of noise are not the task's.
3. The model spec's ``calibration`` hook (``n -> n batches of inputs``): zoo models with a task give
   their own task's training inputs.
4. A built-in zoo model without a task (random weights): its sampler's inputs, which are what its
   benchmark feeds.

A user's model with none of these is refused in one line naming ``--calibration FILE`` and the hook:
pruning on silent random data would look like it worked.

Items are split into calibration items (the statistics) and held-out items (the agreement of the
pruned model's outputs with the unpruned one's, `deploykit.prune.recover.output_agreement`), drawn
after the calibration items from the same source; a file with no items beyond those asked for has no
held-out items, and agreement is then measured on example inputs (and says so).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from deploykit.core.errors import UsageError

if TYPE_CHECKING:
    import torch

    from deploykit.model.spec import ModelSpec

#: calibration items (sequences, images, utterances) by default: the Wanda and SparseGPT papers' 128
DEFAULT_SAMPLES = 128
#: held-out items the output agreement is measured on, when the source has them
HELD_OUT_ITEMS = 32
#: items per forward pass over the calibration data
BATCH_ITEMS = 16
#: the largest calibration file read (its tensors' bytes, uncompressed)
MAX_FILE_BYTES = 4 << 30
#: the suffixes a calibration file may have
FILE_SUFFIXES = (".npz", ".safetensors")
RANDOM = "random"
#: seed of calibration draws (a sampler's first batch, the zoo's hooks): apart from the seeds example and
#: parity inputs use (0, 1, 100...) and training loops, so calibration items are not the items parity is
#: checked on
CALIBRATION_SEED = 7_000


@dataclass(frozen=True)
class Calibration:
    """Calibration inputs in batches, the held-out items, and where they came from."""

    batches: "tuple[tuple[torch.Tensor, ...], ...]"
    held_out: "tuple[tuple[torch.Tensor, ...], ...]"
    #: "the model's calibration hook", "file calib.npz (sha256 ...)", "random inputs", ...
    source: str
    items: int
    #: what makes the statistics weaker than they look (random inputs), for the manifest
    warning: str | None = None

    def record(self) -> dict:
        return {"source": self.source, "items": self.items,
                "held_out_items": sum(_items(b) for b in self.held_out),
                **({"warning": self.warning} if self.warning else {})}


def calibration_data(spec: "ModelSpec", choice: str | None, samples: int, method: str) -> Calibration:
    """`samples` calibration items (and up to HELD_OUT_ITEMS held out) for `method` on `spec`'s model,
    from `choice` (a file path, "random", or None: the model's own), as the module docstring orders."""
    if choice == RANDOM:
        batches = _drawn(lambda i: spec.example_inputs(BATCH_ITEMS, seed=CALIBRATION_SEED + i), samples + HELD_OUT_ITEMS)
        return _split(batches, samples, "random example inputs (--calibration random)",
                      "calibrated on random inputs (--calibration random): activation statistics of noise, not of "
                      "the task; quality after pruning may be far from what real data gives")
    entry = _entry_point(choice)
    if entry is not None:
        from deploykit.model.entrypoint import load_factory  # torch side

        function, where = load_factory(entry), f"calibration entry point {entry.text}"
        batches = _gathered(lambda count: _batches_of(function, count, spec, where), samples + HELD_OUT_ITEMS, where)
        return _split(batches, samples, f"{entry.text} (an entry point giving batches)")
    if choice is not None:
        tensors, source = read_calibration_file(choice, spec)
        items = _items(tensors)
        if items < samples:
            raise UsageError(f"calibration file {choice!r} holds {items} item{'s' * (items != 1)}; {method} is asked to "
                             f"calibrate on {samples} (--calibration-samples): give a file with at least {samples}, or "
                             f"--calibration-samples {items}")
        batches = [tuple(t[i:i + BATCH_ITEMS] for t in tensors) for i in range(0, items, BATCH_ITEMS)]
        return _split(batches, samples, source)
    if spec.calibration is not None:
        where = f"the calibration hook of {spec.name}"
        batches = _gathered(lambda count: _batches_of(spec.calibration, count, spec, where), samples + HELD_OUT_ITEMS,
                            where)
        return _split(batches, samples, f"{spec.name}'s calibration hook (its task's inputs)")
    if spec.sampler is not None and is_builtin(spec):
        batches = _drawn(lambda i: spec.example_inputs(BATCH_ITEMS, seed=CALIBRATION_SEED + i), samples + HELD_OUT_ITEMS)
        return _split(batches, samples, f"{spec.name}'s sampler (the inputs its benchmark feeds)")
    raise UsageError(f"{method} prunes from calibration data and {spec.name} has none: give --calibration FILE (.npz or "
                     f".safetensors of tensors named {', '.join(spec.input_names) or 'like its inputs'}, items on the "
                     "first axis) or a calibration hook in its spec (ModelSpec.calibration); --calibration random "
                     "prunes on random inputs (said in the manifest)")


def _entry_point(choice: str | None):
    """The entry point `choice` names (`data.py:batches`, `package.module:batches`), or None."""
    from deploykit.model.entrypoint import parse_entry_point  # torch side: plans are read by the torch-free CLI

    if choice is None or choice == RANDOM or choice.endswith(FILE_SUFFIXES):
        return None
    return parse_entry_point(choice)


def _batches_of(function, count: int, spec: "ModelSpec", where: str) -> list:
    """`count` batches from a function of the batch count (a spec's hook, an entry point), each checked
    against the model's inputs like a file's tensors; what the function raises is one line."""
    try:
        batches = list(function(count))
    except Exception as exc:  # noqa: BLE001 - the user's code: what it raised is theirs to read
        raise UsageError(f"{where} failed: {type(exc).__name__}: {exc}") from None
    return _validated(batches, spec, where)


def _validated(batches, spec: "ModelSpec", where: str) -> list:
    """Each batch as a tuple of the model's input tensors, checked as a file's tensors are (`_checked`)."""
    import torch

    checked = []
    for batch in batches:
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if len(batch) < len(spec.inputs) or not all(isinstance(t, torch.Tensor) for t in batch):
            raise UsageError(f"{where}: each batch must be a tuple of {len(spec.inputs)} "
                             f"tensor{'s' * (len(spec.inputs) != 1)} ({', '.join(spec.input_names)})")
        # tensors after the inputs are what the model's trace forward reads besides them (an ESPnet
        # decoder's teacher-forced prefix): passed on as they are
        checked.append(tuple(torch.as_tensor(_checked(t.detach().cpu().numpy(), s, where))
                             for t, s in zip(batch, spec.inputs)) + batch[len(spec.inputs):])
    return checked


def is_builtin(spec: "ModelSpec") -> bool:
    """A model of deploykit's own zoo (its sampler draws the inputs its benchmarks feed)."""
    return getattr(spec.build, "__module__", "").startswith("deploykit.model.zoo")


def read_calibration_file(path: str | Path, spec: "ModelSpec") -> "tuple[tuple[torch.Tensor, ...], str]":
    """The tensors of an .npz/.safetensors calibration file in the order of `spec`'s inputs, checked
    against them, and a description of the file (name, items, SHA-256)."""
    import hashlib

    import torch

    path = Path(path)
    if path.suffix not in FILE_SUFFIXES:
        raise UsageError(f"calibration file {str(path)!r}: expected {' or '.join(FILE_SUFFIXES)} (tensors named like "
                         f"the model's inputs), or --calibration random")
    if not path.is_file():
        raise UsageError(f"calibration file {str(path)!r} does not exist or is not a file")
    arrays = _read_npz(path) if path.suffix == ".npz" else _read_safetensors(path)
    names = spec.input_names
    missing = [n for n in names if n not in arrays]
    unknown = sorted(set(arrays) - set(names))
    if missing or unknown:
        raise UsageError(f"calibration file {str(path)!r} holds {', '.join(sorted(arrays)) or 'no tensors'}; the model's "
                         f"inputs are {', '.join(names)}"
                         + (f" ({', '.join(missing)} missing" if missing else " (")
                         + (f"{'; ' if missing else ''}{', '.join(unknown)} unknown)" if unknown else ")"))
    tensors = tuple(_checked(arrays[s.name], s, path) for s in spec.inputs)
    counts = {s.name: int(t.shape[0]) for s, t in zip(spec.inputs, tensors)}
    if len(set(counts.values())) > 1:
        raise UsageError(f"calibration file {str(path)!r}: its tensors hold different numbers of items (first axis): "
                         + ", ".join(f"{n} {c}" for n, c in counts.items()))
    if not tensors or tensors[0].shape[0] == 0:
        raise UsageError(f"calibration file {str(path)!r} holds no items")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return tuple(torch.as_tensor(t) for t in tensors), f"file {path.name} ({tensors[0].shape[0]} items, sha256 {digest[:16]})"


def _read_npz(path: Path) -> dict:
    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive:
            total = sum(info.file_size for info in archive.infolist())
        if total > MAX_FILE_BYTES:
            raise UsageError(f"calibration file {str(path)!r} unpacks to {total:,} bytes, over the {MAX_FILE_BYTES:,} "
                             "read")
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except UsageError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"calibration file {str(path)!r} is not a readable .npz ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:120]})") from None


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if path.stat().st_size > MAX_FILE_BYTES:
        raise UsageError(f"calibration file {str(path)!r} is {path.stat().st_size:,} bytes, over the "
                         f"{MAX_FILE_BYTES:,} read")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise UsageError(f"calibration file {str(path)!r} is not a readable .safetensors ({type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:120]})") from None


def _checked(array, spec, path: Path | str):
    """`array` as the input `spec` takes: its rank and fixed axes, a float array for a float input and an
    integer one (within [0, high)) for an integer input, cast to the input's dtype."""
    import numpy as np

    where = f"calibration file {str(path)!r}: {spec.name!r}" if isinstance(path, Path) else f"{path}: {spec.name!r}"
    if array.ndim != len(spec.shape):
        raise UsageError(f"{where} has {array.ndim} axes {tuple(array.shape)}; the input has {len(spec.shape)} "
                         f"({', '.join(map(str, spec.shape))}), items on the first")
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(want, int) and want != got:
            raise UsageError(f"{where} has size {got} on axis {axis}; the input's is {want} (shape "
                             f"{', '.join(map(str, spec.shape))})")
    integer = spec.dtype.startswith("int")
    if integer != np.issubdtype(array.dtype, np.integer) or not (integer or np.issubdtype(array.dtype, np.floating)):
        raise UsageError(f"{where} is {array.dtype}; the input takes {spec.dtype} ("
                         f"{'integers' if integer else 'floating-point values'})")
    if integer and array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or (spec.high is not None and high >= spec.high):
            raise UsageError(f"{where} holds values in [{low}, {high}]; the input takes [0, {spec.high})")
    if not integer and array.size and not np.isfinite(array).all():
        raise UsageError(f"{where} holds NaN or infinite values")
    return np.ascontiguousarray(array.astype(spec.dtype, copy=False))


def _items(batch: "Sequence[torch.Tensor]") -> int:
    return int(batch[0].shape[0]) if batch else 0


def _drawn(draw, items: int) -> list:
    batches, i = [], 0
    while sum(_items(b) for b in batches) < items:
        batches.append(tuple(draw(i)))
        i += 1
    return batches


def _gathered(draw, items: int, name: str) -> list:
    """Batches from a hook taking a batch count, until `items` items (or what the hook has)."""
    count = max(1, -(-items // BATCH_ITEMS))
    batches = [tuple(b) for b in draw(count)]
    if not batches:
        raise UsageError(f"{name} gave no batches")
    have = sum(_items(b) for b in batches)
    if have < items:  # the hook's batches are smaller than ours: ask for as many more as that needs
        more = [tuple(b) for b in draw(-(-count * items // max(have, 1)))]
        batches = more if sum(_items(b) for b in more) > have else batches
    return batches


def _split(batches: list, samples: int, source: str, warning: str | None = None) -> Calibration:
    """The first `samples` items as calibration batches (at most BATCH_ITEMS each; batches of different
    lengths stay apart), up to HELD_OUT_ITEMS after them held out."""
    items = sum(_items(b) for b in batches)
    if items < samples:
        raise UsageError(f"{source} gave {items} items; --calibration-samples asks for {samples}")
    calibration, held, taken = [], [], 0
    for batch in batches:
        for start in range(0, _items(batch), BATCH_ITEMS):
            piece = tuple(t[start:start + BATCH_ITEMS] for t in batch)
            if taken < samples:  # a piece straddling the boundary gives its rest to the held-out items
                head = samples - taken
                calibration.append(tuple(t[:head] for t in piece))
                piece = tuple(t[head:] for t in piece)
                taken += _items(calibration[-1])
            room = samples + HELD_OUT_ITEMS - taken
            if room > 0 and _items(piece):
                held.append(tuple(t[:room] for t in piece))
                taken += _items(held[-1])
    return Calibration(tuple(calibration), tuple(held), source, samples, warning)
