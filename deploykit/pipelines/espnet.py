"""ESPnet speech translation under PyTorch: export encoder and decoder, and decode with the PyTorch model.

Needs the `espnet` extra. The model itself is built by `deploykit.model.espnet`. The encoder is exported
through espnet_onnx's wrapper modules, with our own conversion map (the PyPI wheel does not ship
`convert_map.yml`) and torch's TorchScript exporter (`dynamo=False`; espnet_onnx pins opset 12
otherwise): it maps features (1, time, 80) to `encoder_out`. The decoder caches attention keys and
values (`deploykit.pipelines.espnet_decoder`: the encoder output projected once, then one token per
step), or, where its structure does not allow that, is espnet_onnx's decoder (the token prefix, the
encoder output and per-layer output caches). Every export checks ONNX Runtime against PyTorch on both.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from deploykit.convert.onnx_export import check_parity, export_onnx, max_abs_errors, sparsify_initializers
from deploykit.convert.onnx_settings import DEFAULT_OPSET, ONNX_TOLERANCE
from deploykit.core.ort import ort_session
from deploykit.core.outputs import host_array
from deploykit.model.artifact import ST_CONFIG_FILE, WEIGHTS_FILE
from deploykit.model.espnet import encode_features, quiet_espnet, sos_eos
from deploykit.pipelines.encoder_fusion import EncoderFusion, fuse_encoder
from deploykit.pipelines.espnet_decoder import CachedStep, MemoryKeysValues, unsupported
from deploykit.pipelines.st_decode import STSession, decoder_files, graph_decoder, max_tokens, state_after, translate
from deploykit.runtime.loading import load_cpu_session_model, load_torch_model
from deploykit.runtime.session import RuntimeInfo, Target
from deploykit.runtime.torch_session import in_precision

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
DECODER_MEMORY_FILE = "decoder_memory.onnx"
#: the longest feature / token sequence the exported positional tables cover
MAX_SEQ_LEN = 2048

#: espnet class -> export wrapper, in the order espnet_onnx applies them (subclasses first):
#: ESPnet's positional encodings grow a cache in Python, which tracing would freeze at one length;
#: espnet_onnx's wrappers precompute a table of MAX_SEQ_LEN positions instead. The relative-position
#: encoding and attention are ours (`deploykit.pipelines.espnet_relpos`): espnet_onnx's table slice
#: defeats onnxruntime's transformer optimiser.
CONVERT_MAP = {
    "espnet.nets.pytorch_backend.transformer.embedding.LegacyRelPositionalEncoding":
        "espnet_onnx.export.asr.models.layers.embed.OnnxLegacyRelPositionalEncoding",
    "espnet.nets.pytorch_backend.transformer.embedding.ScaledPositionalEncoding":
        "espnet_onnx.export.asr.models.layers.embed.OnnxScaledPositionalEncoding",
    "espnet.nets.pytorch_backend.transformer.embedding.RelPositionalEncoding":
        "deploykit.pipelines.espnet_relpos.ExportRelPositionalEncoding",
    "espnet.nets.pytorch_backend.transformer.attention.RelPositionMultiHeadedAttention":
        "deploykit.pipelines.espnet_relpos.ExportRelPositionAttention",
    "espnet.nets.pytorch_backend.transformer.embedding.PositionalEncoding":
        "espnet_onnx.export.asr.models.layers.embed.OnnxPositionalEncoding",
}


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def onnx_encoder(model: nn.Module, feats_dim: int) -> nn.Module:
    """espnet_onnx's encoder wrapper around a copy of `model.encoder`, our conversion map applied."""
    with quiet_espnet():
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


def _export_decoder(model: nn.Module, directory: Path, memory: torch.Tensor, opset: int) -> dict[str, Any]:
    """Write the decoder's graphs into `directory` and return their st_config entries: keys and values
    cached (`deploykit.pipelines.espnet_decoder`) where the decoder's structure allows, else espnet_onnx's
    decoder, whose cache holds layer outputs, with the reason."""
    reason = unsupported(model.decoder)
    if reason is None:
        decoder = copy.deepcopy(model.decoder).eval()
        project, step = MemoryKeysValues(decoder).eval(), CachedStep(decoder).eval()
        projected = project.output_names()
        export_onnx(project, (memory,), directory / DECODER_MEMORY_FILE, input_names=["memory"],
                    output_names=projected, dynamic_axes={"memory": {1: "encoder_frames"},
                                                          **{name: {2: "encoder_frames"} for name in projected}},
                    opset=opset)
        with torch.no_grad():
            keys_values = project(memory)
        export_onnx(step, step.example_inputs(keys_values), directory / DECODER_FILE, input_names=step.input_names(),
                    output_names=step.output_names(), dynamic_axes=step.dynamic_axes(), opset=opset)
        return {"decoder": DECODER_FILE, "decoder_cache": "keys-values", "decoder_memory": DECODER_MEMORY_FILE}
    layers, size = len(model.decoder.decoders), model.decoder.decoders[0].size
    tgt = torch.tensor([[sos_eos(model), 3, 5]])
    # espnet_onnx's caches hold one dummy position plus the earlier steps: as long as the prefix
    caches = [torch.zeros(1, tgt.shape[1], size) for _ in range(layers)]
    export_onnx(onnx_decoder(model), (tgt, memory, caches), directory / DECODER_FILE,
                input_names=["tgt", "memory"] + [f"cache_{i}" for i in range(layers)],
                output_names=["y"] + [f"out_cache_{i}" for i in range(layers)],
                dynamic_axes={"tgt": {1: "tokens"}, "memory": {1: "encoder_frames"},
                              **{f"cache_{i}": {1: "cached"} for i in range(layers)}}, opset=opset)
    return {"decoder": DECODER_FILE, "decoder_cache": "layer-outputs", "decoder_cache_reason": reason}


def onnx_decoder(model: nn.Module) -> nn.Module:
    with quiet_espnet():
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
    #: the transformer optimiser's outcome on the encoder (None: not tried)
    fusion: EncoderFusion | None = None


def export_st(
    model: nn.Module,
    directory: str | Path,
    feats_dim: int,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float = ONNX_TOLERANCE,
    frames: int = 200,
    sparse: bool = False,
    fuse: bool = True,
) -> STExport:
    """Write encoder.onnx, decoder.onnx and st_config.json into `directory` and check both models.

    `frames` of random features (the 10 ms frames of 2 s of audio, by default) trace the encoder;
    parity is checked on a different length to prove the time axis is dynamic. With `sparse`,
    initializers are stored sparse where smaller, before the check, so the files checked are the
    files shipped. With `fuse`, onnxruntime's transformer optimiser is tried on the encoder, which
    is replaced only where the fused graph holds parity at every length and is faster
    (`deploykit.pipelines.encoder_fusion`).
    """
    directory = Path(directory)
    generator = torch.Generator().manual_seed(0)
    encoder = onnx_encoder(model, feats_dim)
    layers = len(model.decoder.decoders)
    size = model.decoder.decoders[0].size
    feats = torch.randn(1, frames, feats_dim, generator=generator)
    export_onnx(encoder, (feats,), directory / ENCODER_FILE, input_names=["feats"],
                output_names=["encoder_out", "encoder_out_lens"],
                dynamic_axes={"feats": {1: "frames"}, "encoder_out": {1: "encoder_frames"}}, opset=opset)
    fusion = fuse_encoder(directory / ENCODER_FILE, partial(_encode_numpy, model), feats_dim, tolerance) if fuse else None
    with torch.no_grad():
        memory = encoder(feats)[0]
    decoder_config = _export_decoder(model, directory, memory, opset)
    sparse_initializers = {}
    if sparse:
        for name in (ENCODER_FILE, *decoder_files(decoder_config)):
            sparse_initializers.update({f"{name}:{k}": v for k, v in sparsify_initializers(directory / name).items()})

    other = torch.randn(1, frames + 37, feats_dim, generator=generator)  # another length: dynamic axis
    session = ort_session(directory / ENCODER_FILE, threads=1)
    reference = _encode_numpy(model, other.numpy())
    encoder_error = max_abs_errors([reference], session.run(["encoder_out"], {"feats": other.numpy()}),
                                   ["encoder_out"])
    check_parity("encoder onnxruntime vs PyTorch", encoder_error, tolerance)

    ort_steps = graph_decoder(directory, {**decoder_config, "decoder_layers": layers, "decoder_size": size}).stepper(reference)
    prefix = [sos_eos(model), 7, 11, 13]
    with torch.no_grad():  # ESPnet recomputing the whole prefix...
        torch_logp, _ = torch_step(model, prefix, torch.from_numpy(reference), None)
    # ...against the exported decoder stepping through it with its cache
    ort_logp, _ = ort_steps.step(prefix, state_after(ort_steps, prefix[:-1]))
    decoder_error = max_abs_errors([torch_logp.numpy()], [ort_logp], ["logp"])
    check_parity("decoder step onnxruntime vs PyTorch", decoder_error, tolerance)

    config = {
        "encoder": ENCODER_FILE, **decoder_config, "feats_dim": feats_dim, "decoder_layers": layers,
        "decoder_size": size, "sos": sos_eos(model), "eos": sos_eos(model), "vocab_size": model.vocab_size,
        "max_seq_len": MAX_SEQ_LEN, "opset": opset, "normalization_in_encoder": model.normalize is not None,
        "frontend": _frontend_description(model),
        "encoder_fusion": fusion.record() if fusion is not None else None,
    }
    (directory / ST_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return STExport(config, encoder_error["encoder_out"], decoder_error["logp"], sparse_initializers, fusion)


def _encode_numpy(model: nn.Module, feats: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return host_array(encode_features(model, torch.from_numpy(feats)))


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
        return host_array(logp), state


class TorchTranslator:
    """The PyTorch model behind the translator interface of `deploykit.pipelines.st_decode`."""

    #: its tensors as numpy arrays (bf16 under autocast, which numpy has no type for, as float32)
    host = staticmethod(host_array)

    def __init__(self, model: nn.Module):
        self.model = model
        self.sos = self.eos = sos_eos(model)
        self.vocab_size = model.vocab_size

    def encode(self, feats) -> torch.Tensor:
        with torch.no_grad():
            return encode_features(self.model, torch.as_tensor(feats))

    def stepper(self, memory: torch.Tensor) -> TorchStepper:
        return TorchStepper(self.model, memory)


class TorchCachedStepper:
    """Next-token log-probabilities from the exported decoder's algorithm run by PyTorch: the encoder
    output's keys and values projected once, then one token per step with the grown caches
    (`MemoryKeysValues`, `CachedStep`: the modules export traced)."""

    def __init__(self, translator: "TorchCachedTranslator", memory: torch.Tensor):
        self.translator, self.memory, self.projected = translator, memory, None

    def start(self):
        if self.projected is None:
            with torch.no_grad():
                self.projected = self.translator.project(torch.as_tensor(self.memory))
        return self.translator.empty

    def step(self, tokens: list[int], state):
        with torch.no_grad():
            logp, *grown = self.translator.cached_step(torch.tensor([[tokens[-1]]]), torch.tensor([len(tokens) - 1]),
                                                       *state, *self.projected)
        return host_array(logp[0]), tuple(grown)


class TorchCachedTranslator(TorchTranslator):
    """The PyTorch model decoding with the exported decoder's algorithm (keys and values cached), so
    that a torch row against an onnxruntime row compares runtimes, not algorithms."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        decoder = model.decoder
        self.project, self.cached_step = MemoryKeysValues(decoder).eval(), CachedStep(decoder).eval()
        self.empty = tuple(torch.zeros(1, layer.self_attn.h, 0, layer.self_attn.d_k)
                           for layer in decoder.decoders for _ in range(2))

    def stepper(self, memory: torch.Tensor) -> TorchCachedStepper:
        return TorchCachedStepper(self, memory)


#: the torch stages that time the exported decoder's algorithm, beside ESPnet's own (decoder-step, greedy)
CACHED_STAGES = ("decoder-step-cached", "greedy-cached")


class TorchSTSession(STSession):
    """The torch session of an ST artifact: ESPnet's own decoding (every step recomputes the prefix:
    what the export is compared with, as ESPnet runs), and, where the decoder caches keys and values
    when exported, the same algorithm as the export under PyTorch (`CACHED_STAGES`)."""

    def __init__(self, model: nn.Module, info: RuntimeInfo, files: Sequence[str]):
        super().__init__(TorchTranslator(model), info, files)
        self.cached = TorchCachedTranslator(model) if unsupported(model.decoder) is None else None

    def stages(self, feeds):
        out = super().stages(feeds)
        if self.cached is not None:
            feats = self._features(feeds)
            memory, stepper, prefix, state = self._step_ready(feats, self.cached)
            limit = max_tokens(memory)
            out["decoder-step-cached"] = lambda: stepper.step(prefix, state)
            out["greedy-cached"] = lambda: translate(self.cached, feats, limit)
        return out


def decode_torch(model: nn.Module, feats: torch.Tensor, max_tokens: int, beam: int = 1) -> list[int]:
    """Decoding with the PyTorch model: the reference the ONNX decoder must reproduce."""
    return translate(TorchTranslator(model), feats, max_tokens, beam)


def load_torch_session(directory: str | Path, threads: int, target: Target) -> STSession:
    """The benchmark session of an exported ST artifact under PyTorch (its form's execution module);
    CPU only: TorchTranslator builds its token and mask tensors there."""
    model = load_cpu_session_model(directory, threads, target, "speech translation")
    return in_precision(TorchSTSession(model, RuntimeInfo("torch", torch.__version__, threads, "cpu"), [WEIGHTS_FILE]),
                        target)


def reference_session(directory: str | Path, consent: Sequence[str] = ()) -> STSession:
    """What every runtime's ST session must reproduce: a session over the stripped PyTorch model."""
    model, _ = load_torch_model(directory, for_runtime=False, consent=consent)
    info = RuntimeInfo("torch", torch.__version__, torch.get_num_threads(), "cpu")
    return STSession(TorchTranslator(model), info, [])
