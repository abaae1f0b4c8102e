"""ESPnet speech-translation models: build one from a config, or load a real experiment.

Needs the `espnet` extra (imported on use). A model is built with `espnet2.tasks.st.STTask.build_model`
from a config (the zoo's YAML presets, or a real experiment's `config.yaml`), or loaded from an
experiment directory or zip (`config.yaml` plus `valid.acc.ave.pth` / `model.pth`), with every path
the config names confined to the experiment and weights read with `weights_only=True`.

This is the model side only: how to build the network and run one pass through every layer
(`trace_forward`, registered for tracing and dependency graphs on import). Exporting and decoding
it are the speech-translation pipeline's (`deploykit.pipelines.espnet`, `deploykit.pipelines.st_decode`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from deploykit.core.confine import check_named_paths, inside
from deploykit.core.errors import ArtifactError
from deploykit.core.extras import require
from deploykit.core.fsutil import read_text
from deploykit.core.hooks import TRACE_FORWARDS


@contextlib.contextmanager
def quiet_espnet():
    """ESPnet's imports try to download NLTK data and log deprecation notes: keep that out of the CLI."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _st_task():
    with quiet_espnet():
        return require("espnet2.tasks.st", "an ESPnet model").STTask


def token_list(vocab_size: int) -> list[str]:
    """A synthetic vocabulary: blank, unk, `vocab_size - 3` tokens, sos/eos (ESPnet's layout)."""
    return ["<blank>", "<unk>"] + [f"tok{i}" for i in range(vocab_size - 3)] + ["<sos/eos>"]


def build_st_model(config: dict[str, Any]) -> nn.Module:
    """An ESPnetSTModel from a config dict: ESPnet's parser defaults, overridden by the config's keys.

    A config without `token_list` gets a synthetic vocabulary of `vocab_size` entries.
    """
    task = _st_task()
    parser = task.get_parser()
    args = argparse.Namespace(**{a.dest: a.default for a in parser._actions if a.dest != "help"})
    config = dict(config)
    vocab = config.pop("token_list", None) or token_list(config.pop("vocab_size", 64))
    config.pop("vocab_size", None)
    for key, value in {"frontend": None, "specaug": None, "normalize": None, "preencoder": None,
                       "postencoder": None, "extra_asr_decoder": None, "extra_mt_decoder": None}.items():
        setattr(args, key, value)
    for key, value in config.items():
        setattr(args, key, value)
    args.token_list = vocab
    args.src_token_list = config.get("src_token_list") or vocab
    with quiet_espnet():
        model = task.build_model(args)
    return model.eval()


def _safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip, refusing entries that would land outside `target` (absolute paths, `..`, links)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            root = target.resolve()
            for info in zf.infolist():
                destination = (target / info.filename).resolve()
                if destination != root and root not in destination.parents:
                    raise ArtifactError(f"{str(archive)!r}: entry {info.filename!r} escapes the extraction directory")
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ArtifactError(f"{str(archive)!r}: entry {info.filename!r} is a symbolic link")
            zf.extractall(target)
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"{str(archive)!r} is not a readable zip: {exc}") from None


#: model files an ESPnet experiment may hold, in order of preference
MODEL_FILES = ("valid.acc.ave.pth", "valid.acc.best.pth", "model.pth")


def load_st_experiment(path: str | Path, workdir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a real ESPnet ST experiment: a directory or zip with config.yaml and a model .pth.

    Zips are extracted into `workdir` (safely). Weights are read with `weights_only=True`.
    """
    import yaml

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"ESPnet experiment {str(path)!r} does not exist")
    root = path
    if path.is_file():
        root = Path(workdir) / "experiment"
        root.mkdir(parents=True, exist_ok=True)
        _safe_extract(path, root)
    configs = sorted(root.rglob("config.yaml"))
    if not configs:
        raise ArtifactError(f"{str(path)!r} holds no config.yaml")
    config_path = configs[0]
    weights = next((p for name in MODEL_FILES for p in sorted(root.rglob(name))), None)
    if weights is None:
        raise ArtifactError(f"{str(path)!r} holds none of {', '.join(MODEL_FILES)}")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read {str(config_path)!r}: {exc}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{str(config_path)!r} is not an ESPnet config (not a mapping)")
    # every key, not only those read below: ESPnet's builders open files their configs name too
    check_named_paths(config, root, str(config_path), absolute_if_missing=True)
    config = _with_local_files(config, root)
    model = build_st_model(config)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # unpickling refusals, shape mismatches: all mean "not this model's weights"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"cannot load {str(weights)!r} into the model of {str(config_path)!r}: {first}") from None
    return model.eval(), config


def _local_file(value: str, root: Path, what: str) -> Path:
    """A file an experiment's config names by its path in the recipe (espnet_model_zoo's zips keep
    that layout): found under `root` at that relative path, or by its name if unique there."""
    relative = Path(value)
    if not relative.is_absolute() and inside(root, value, what).is_file():
        return root / relative
    # a file reached through a symbolic link that leads out of the experiment is not in it
    matches = sorted(p for p in root.rglob(relative.name) if p.is_file() and p.resolve().is_relative_to(root.resolve()))
    if len(matches) != 1:
        found = "no file" if not matches else f"{len(matches)} files"
        raise ArtifactError(f"the config names {what} {value!r}, and the experiment holds {found} of that name")
    return matches[0]


def _with_local_files(config: dict[str, Any], root: Path) -> dict[str, Any]:
    """The config with its file references (normalisation statistics, token lists) read from the experiment."""
    config = copy.deepcopy(config)
    stats = (config.get("normalize_conf") or {}).get("stats_file")
    if config.get("normalize") == "global_mvn" and isinstance(stats, str):
        config["normalize_conf"]["stats_file"] = str(_local_file(stats, root, "statistics file"))
    for key in ("token_list", "src_token_list"):
        if isinstance(config.get(key), str):
            text = read_text(_local_file(config[key], root, key), key, ArtifactError)
            config[key] = [line.split()[0] for line in text.splitlines() if line.strip()]
    return config


def sos_eos(model: nn.Module) -> int:
    return model.sos  # ESPnet uses one id, the last of the vocabulary, for both


def feats_dim(model: nn.Module, config: dict[str, Any]) -> int:
    """Width of the features the exported encoder takes: the frontend's output, else the config's input size."""
    if model.frontend is not None:
        return model.frontend.output_size()
    if not isinstance(config.get("input_size"), int):
        raise ArtifactError("an ESPnet config without a frontend must give input_size (the feature width)")
    return config["input_size"]


def encode_features(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Encoder output for a batch of equal-length feature sequences (the frontend's output).

    The frontend (STFT and filterbank, for raw-audio models) is preprocessing, kept out of the
    exported graph as espnet_onnx does; feature normalisation is part of the model, and of encoder.onnx.
    """
    lengths = torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long)
    if model.normalize is not None:
        # ESPnet's GlobalMVN normalises in place: on the caller's tensor, a second call would normalise
        # twice (found once a plan stopped emptying the layer that hid it: outputs no longer constant)
        feats, lengths = model.normalize(feats.clone(), lengths)
    return model.encoder(feats, lengths)[0]


#: the token prefix the trace forward teacher-forces through the decoder (ids valid in any vocabulary >= 8)
TRACE_TOKENS = (3, 5, 7)


def trace_forward(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass through every layer of an ST model, for tracing and form parity: features -> encoder
    output, and the decoder's logits over a fixed token prefix (teacher forcing).

    `ESPnetSTModel.forward` needs speech, text and their lengths and returns a loss, which tells a
    dependency graph nothing about the deployed layers. A second input (calibration batches) is the token
    prefix to teacher-force instead of the fixed one."""
    feats, *prefix = inputs
    memory = encode_features(model, feats)
    batch = feats.shape[0]
    # a calibration batch carries the decoder's prefix (sos and the reference translation: what the decoder
    # reads when it translates); tracing and parity use the fixed one
    tgt = prefix[0] if prefix else torch.tensor([[sos_eos(model), *TRACE_TOKENS]] * batch)
    lengths = torch.full((batch,), memory.shape[1], dtype=torch.long)
    logits, _ = model.decoder(memory, lengths, tgt, torch.full((batch,), tgt.shape[1], dtype=torch.long))
    return memory, logits


TRACE_FORWARDS.add("espnet2.st.espnet_model.ESPnetSTModel", trace_forward)
