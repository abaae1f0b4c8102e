"""ESPnet speech translation: build or load a model, export encoder and decoder, decode greedily.

Needs the `espnet` extra. A model is built with `espnet2.tasks.st.STTask.build_model` from a config
(the zoo's YAML presets, or a real experiment's `config.yaml`), or loaded from an experiment
directory or zip (`config.yaml` plus `valid.acc.ave.pth` / `model.pth`).

Export goes through espnet_onnx's wrapper modules, with our own conversion map (the PyPI wheel does
not ship `convert_map.yml`) and torch's TorchScript exporter (`dynamo=False`; espnet_onnx pins
opset 12 otherwise): the encoder maps features (1, time, 80) to `encoder_out`, the decoder maps the
token prefix, the encoder output and per-layer caches to the next token's log-probabilities and new
caches. Every export checks ONNX Runtime against PyTorch on both.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .confine import check_named_paths, inside
from .errors import ArtifactError, UsageError
from .fsutil import read_text
from .hooks import TRACE_FORWARDS
from .onnx_export import DEFAULT_OPSET, ONNX_TOLERANCE, check_parity, export_onnx, max_abs_errors, sparsify_initializers
from .runtime import Target
from .st_decode import ST_CONFIG_FILE, OrtSTDecoder, OrtStepper, STSession, state_after, translate

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
#: the longest feature / token sequence the exported positional tables cover
MAX_SEQ_LEN = 2048

#: espnet class -> espnet_onnx export wrapper, in the order espnet_onnx applies them (subclasses first):
#: ESPnet's positional encodings grow a cache in Python, which tracing would freeze at one length;
#: the wrappers precompute a table of MAX_SEQ_LEN positions instead.
CONVERT_MAP = {
    "espnet.nets.pytorch_backend.transformer.embedding.LegacyRelPositionalEncoding":
        "espnet_onnx.export.asr.models.layers.embed.OnnxLegacyRelPositionalEncoding",
    "espnet.nets.pytorch_backend.transformer.embedding.ScaledPositionalEncoding":
        "espnet_onnx.export.asr.models.layers.embed.OnnxScaledPositionalEncoding",
    "espnet.nets.pytorch_backend.transformer.embedding.RelPositionalEncoding":
        "espnet_onnx.export.asr.models.layers.embed.OnnxRelPositionalEncoding",
    "espnet.nets.pytorch_backend.transformer.embedding.PositionalEncoding":
        "espnet_onnx.export.asr.models.layers.embed.OnnxPositionalEncoding",
}


@contextlib.contextmanager
def _quiet():
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
    try:
        with _quiet():
            from espnet2.tasks.st import STTask
    except ImportError:
        raise UsageError("ESPnet models need the espnet extra: pip install 'deploykit[espnet]'") from None
    return STTask


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
    with _quiet():
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


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def onnx_encoder(model: nn.Module, feats_dim: int) -> nn.Module:
    """espnet_onnx's encoder wrapper around a copy of `model.encoder`, our conversion map applied."""
    with _quiet():
        from espnet_onnx.export.asr.models.encoder_wrapper import DefaultEncoder
        from espnet_onnx.utils.export_function import replace_modules

    replacements = [{"from": _import_class(src), "to": _import_class(dst), "max_seq_len": MAX_SEQ_LEN}
                    for src, dst in CONVERT_MAP.items()]
    config = {"max_seq_len": MAX_SEQ_LEN}
    encoder = replace_modules(replacements, copy.deepcopy(model.encoder), preencoder=None, export_config=config)
    wrapped = DefaultEncoder(encoder, None, feats_dim=feats_dim, **config)
    return _NormalizedEncoder(copy.deepcopy(model.normalize), wrapped).eval()


class _NormalizedEncoder(nn.Module):
    """The model's feature normalisation (global or utterance MVN, if any) in front of the encoder
    wrapper, so that encoder.onnx takes the frontend's features as they come."""

    def __init__(self, normalize: nn.Module | None, encoder: nn.Module):
        super().__init__()
        self.normalize, self.encoder = normalize, encoder

    def forward(self, feats: torch.Tensor):
        if self.normalize is not None:
            feats, _ = self.normalize(feats, None)  # no lengths: every frame is real (one utterance)
        return self.encoder(feats)


def onnx_decoder(model: nn.Module) -> nn.Module:
    with _quiet():
        from espnet_onnx.export.asr.models.decoders.xformer import XformerDecoder

    return XformerDecoder(copy.deepcopy(model.decoder), max_seq_len=MAX_SEQ_LEN).eval()


@dataclass(frozen=True)
class STExport:
    """What `export_st` wrote, and how closely ONNX Runtime matched PyTorch."""

    config: dict[str, Any]
    encoder_max_abs_error: float
    decoder_max_abs_error: float
    #: "file:initializer" -> nonzeros, for initializers stored sparse (with `sparse=True`)
    sparse_initializers: dict[str, int]


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
    dependency graph nothing about the deployed layers."""
    (feats,) = inputs
    memory = encode_features(model, feats)
    batch = feats.shape[0]
    tgt = torch.tensor([[sos_eos(model), *TRACE_TOKENS]] * batch)
    lengths = torch.full((batch,), memory.shape[1], dtype=torch.long)
    logits, _ = model.decoder(memory, lengths, tgt, torch.full((batch,), tgt.shape[1], dtype=torch.long))
    return memory, logits


TRACE_FORWARDS.add("espnet2.st.espnet_model.ESPnetSTModel", trace_forward)


def export_st(
    model: nn.Module,
    directory: str | Path,
    feats_dim: int,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = ONNX_TOLERANCE,
    frames: int = 200,
    sparse: bool = False,
) -> STExport:
    """Write encoder.onnx, decoder.onnx and st_config.json into `directory` and check both models.

    `frames` of random features (the 10 ms frames of 2 s of audio, by default) trace the encoder;
    parity is checked on a different length to prove the time axis is dynamic. With `sparse`,
    initializers are stored sparse where smaller, before the check, so the files checked are the
    files shipped.
    """
    from .runtime import ort_session

    directory = Path(directory)
    generator = torch.Generator().manual_seed(0)
    encoder = onnx_encoder(model, feats_dim)
    decoder = onnx_decoder(model)
    layers = len(model.decoder.decoders)
    size = model.decoder.decoders[0].size
    feats = torch.randn(1, frames, feats_dim, generator=generator)
    export_onnx(encoder, (feats,), directory / ENCODER_FILE, input_names=["feats"],
                output_names=["encoder_out", "encoder_out_lens"],
                dynamic_axes={"feats": {1: "frames"}, "encoder_out": {1: "encoder_frames"}}, opset=opset)
    with torch.no_grad():
        memory = encoder(feats)[0]
    tgt = torch.tensor([[sos_eos(model), 3, 5]])
    # espnet_onnx's caches hold one dummy position plus the earlier steps: as long as the prefix
    caches = [torch.zeros(1, tgt.shape[1], size) for _ in range(layers)]
    export_onnx(decoder, (tgt, memory, caches), directory / DECODER_FILE,
                input_names=["tgt", "memory"] + [f"cache_{i}" for i in range(layers)],
                output_names=["y"] + [f"out_cache_{i}" for i in range(layers)],
                dynamic_axes={"tgt": {1: "tokens"}, "memory": {1: "encoder_frames"},
                              **{f"cache_{i}": {1: "cached"} for i in range(layers)}}, opset=opset)
    sparse_initializers = {}
    if sparse:
        for name in (ENCODER_FILE, DECODER_FILE):
            sparse_initializers.update({f"{name}:{k}": v for k, v in sparsify_initializers(directory / name).items()})

    other = torch.randn(1, frames + 37, feats_dim, generator=generator)  # another length: dynamic axis
    session = ort_session(directory / ENCODER_FILE, threads=1)
    with torch.no_grad():
        reference = encode_features(model, other).numpy()
    encoder_error = max_abs_errors([reference], session.run(["encoder_out"], {"feats": other.numpy()}),
                                   ["encoder_out"])
    check_parity("encoder onnxruntime vs PyTorch", encoder_error, tolerance)

    ort_steps = OrtStepper(OrtSTDecoder(directory / DECODER_FILE, layers, size), reference)
    prefix = [sos_eos(model), 7, 11, 13]
    with torch.no_grad():  # ESPnet recomputing the whole prefix...
        torch_logp, _ = torch_step(model, prefix, torch.from_numpy(reference), None)
    # ...against the exported decoder stepping through it with its cache
    ort_logp, _ = ort_steps.step(prefix, state_after(ort_steps, prefix[:-1]))
    decoder_error = max_abs_errors([torch_logp.numpy()], [ort_logp], ["logp"])
    check_parity("decoder step onnxruntime vs PyTorch", decoder_error, tolerance)

    config = {
        "encoder": ENCODER_FILE, "decoder": DECODER_FILE, "feats_dim": feats_dim, "decoder_layers": layers,
        "decoder_size": size, "sos": sos_eos(model), "eos": sos_eos(model), "vocab_size": model.vocab_size,
        "max_seq_len": MAX_SEQ_LEN, "opset": opset, "normalization_in_encoder": model.normalize is not None,
        "frontend": _frontend_description(model),
    }
    (directory / ST_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return STExport(config, encoder_error["encoder_out"], decoder_error["logp"], sparse_initializers)


def _frontend_description(model: nn.Module) -> dict[str, Any] | None:
    """How the model turns audio into the encoder's features: users compute them the same way."""
    frontend = model.frontend
    if frontend is None:
        return None
    description: dict[str, Any] = {"class": type(frontend).__name__, "output_size": frontend.output_size()}
    for part in ("stft", "logmel"):
        module = getattr(frontend, part, None)
        if module is not None:
            description[part] = module.extra_repr()
    if getattr(frontend, "fs", None) is not None:
        description["fs"] = frontend.fs
    return description


def torch_step(model: nn.Module, prefix: Sequence[int], memory: torch.Tensor, cache):
    """ESPnet's own one-step decoding: log-probabilities of the next token after `prefix`."""
    from espnet.nets.pytorch_backend.transformer.mask import subsequent_mask

    tgt = torch.tensor([list(prefix)])
    mask = subsequent_mask(len(prefix)).unsqueeze(0)
    logp, cache = model.decoder.forward_one_step(tgt, mask, memory, cache=cache)
    return logp[0], cache


class TorchStepper:
    """Next-token log-probabilities from the PyTorch decoder, with ESPnet's own cache."""

    def __init__(self, model: nn.Module, memory: torch.Tensor):
        self.model, self.memory = model, memory

    def start(self):
        return None

    def step(self, tokens: list[int], state):
        with torch.no_grad():
            logp, state = torch_step(self.model, tokens, self.memory, state)
        return logp.numpy(), state


class TorchTranslator:
    """The PyTorch model behind the translator interface of `deploykit.st_decode`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.sos = self.eos = sos_eos(model)
        self.vocab_size = model.vocab_size

    def encode(self, feats) -> torch.Tensor:
        with torch.no_grad():
            return encode_features(self.model, torch.as_tensor(feats))

    def stepper(self, memory: torch.Tensor) -> TorchStepper:
        return TorchStepper(self.model, memory)


def decode_torch(model: nn.Module, feats: torch.Tensor, max_tokens: int, beam: int = 1) -> list[int]:
    """Decoding with the PyTorch model: the reference the ONNX decoder must reproduce."""
    return translate(TorchTranslator(model), feats, max_tokens, beam)


def load_torch_session(directory: str | Path, threads: int, target: Target) -> STSession:
    """The benchmark session of an exported ST artifact under PyTorch (its form's execution module)."""
    from .artifact import WEIGHTS_FILE, load_torch_model
    from .runtime import RuntimeInfo

    if target.device != "cpu":  # TorchTranslator builds its token and mask tensors on the CPU
        raise UsageError(f"speech translation under torch runs on the CPU only, not {target.device}")
    torch.set_num_threads(threads)
    model, _ = load_torch_model(directory, consent=target.code_consent, batch=target.batch)
    return STSession(TorchTranslator(model), RuntimeInfo("torch", torch.__version__, threads, "cpu"), [WEIGHTS_FILE])


def reference_session(directory: str | Path, consent: Sequence[str] = ()) -> STSession:
    """What every runtime's ST session must reproduce: a session over the stripped PyTorch model."""
    from .artifact import load_torch_model
    from .runtime import RuntimeInfo

    model, _ = load_torch_model(directory, for_runtime=False, consent=consent)
    info = RuntimeInfo("torch", torch.__version__, torch.get_num_threads(), "cpu")
    return STSession(TorchTranslator(model), info, [])
