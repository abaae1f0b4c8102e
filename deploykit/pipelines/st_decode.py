"""Speech-translation decoding over any runtime, and the ONNX side of an exported pair (onnxruntime or
OpenVINO, through `deploykit.runtime.graphs`).

Imports neither torch nor ESPnet: an ONNX runtime's benchmark worker and a deployment that only has the
exported `encoder.onnx` / `decoder.onnx` use this module alone. The PyTorch side (`deploykit.pipelines.espnet`)
implements the same two small interfaces, so one search algorithm and one benchmark session serve
every runtime and their token sequences can be compared exactly:

- a *translator*: `sos`, `eos`, `vocab_size`, `encode(feats) -> memory`, `stepper(memory)`;
- a *stepper*: `start() -> state`, `step(tokens, state) -> (next-token log-probabilities, state)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from deploykit.core.confine import inside, read_json
from deploykit.core.errors import ArtifactError, UsageError
from deploykit.model.artifact import ST_CONFIG_FILE
from deploykit.runtime.graphs import GraphOpener
from deploykit.runtime.session import Target

#: the benchmark's utterance: 5 s of 10 ms feature frames, decoded greedily to <eos>
BENCH_FRAMES = 500
#: tokens already decoded when one decoder step is timed (the step then attends over them via its cache)
STEP_PREFIX = 10
#: padding of token sequences compared across runtimes (after <eos>, or after the token budget)
NO_TOKEN = -1


class OnnxSTDecoder:
    """The exported decoder in an ONNX runtime, with espnet_onnx's cache convention: each layer's
    cache starts as zeros of one dummy position, and the model hands back the caches to feed next."""

    def __init__(self, path: str | Path, layers: int, size: int, opener: GraphOpener = GraphOpener()):
        # it takes turns with the encoder: its threads must not spin while the encoder runs
        self.session = opener(path, spinning=False)
        self.layers, self.size = layers, size

    def initial_cache(self) -> list[np.ndarray]:
        return [np.zeros((1, 1, self.size), dtype=np.float32) for _ in range(self.layers)]

    def step(self, tokens: np.ndarray, memory: np.ndarray, cache: list[np.ndarray]):
        feeds = {"tgt": tokens.astype(np.int64), "memory": memory,
                 **{f"cache_{i}": c for i, c in enumerate(cache)}}
        logp, *cache = self.session.run(None, feeds)
        return logp[0], cache

    def stepper(self, memory: np.ndarray) -> "OnnxStepper":
        return OnnxStepper(self, memory)


class OnnxStepper:
    """Next-token log-probabilities from the exported decoder in an ONNX runtime."""

    def __init__(self, decoder: OnnxSTDecoder, memory: np.ndarray):
        self.decoder, self.memory = decoder, memory

    def start(self):
        return self.decoder.initial_cache()

    def step(self, tokens: list[int], state):
        return self.decoder.step(np.array([tokens]), self.memory, state)


class OnnxCachedDecoder:
    """The exported decoder that caches attention keys and values (`deploykit.pipelines.espnet_decoder`):
    a graph projecting the encoder output into each layer's cross-attention keys and values, once per
    utterance, and a step graph taking one token, its position and the caches."""

    def __init__(self, step_path: str | Path, memory_path: str | Path, opener: GraphOpener = GraphOpener()):
        self.session = opener(step_path, spinning=False)
        self.memory_session = opener(memory_path, spinning=False)
        inputs = self.session.get_inputs()
        # (heads, d_k) per cache: fixed dimensions of the exported graph (heads may differ by layer)
        self.empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
                      for i in inputs if i.name.startswith("self_")}
        self.memory_names = [o.name for o in self.memory_session.get_outputs()]
        self.grown_names = [o.name.removeprefix("new_") for o in self.session.get_outputs()[1:]]

    def project(self, memory: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.memory_names, self.memory_session.run(None, {"memory": memory})))

    def step(self, token: int, position: int, caches: dict, memory: dict):
        feeds = {"token": np.array([[token]], dtype=np.int64), "position": np.array([position], dtype=np.int64),
                 **caches, **memory}
        logp, *grown = self.session.run(None, feeds)
        return logp[0], dict(zip(self.grown_names, grown))

    def stepper(self, memory: np.ndarray) -> "OnnxCachedStepper":
        return OnnxCachedStepper(self, memory)


class OnnxCachedStepper:
    """Next-token log-probabilities from the key/value-caching decoder: the encoder output's keys and
    values are projected when decoding starts, then each step feeds the newest token only."""

    def __init__(self, decoder: OnnxCachedDecoder, memory: np.ndarray):
        self.decoder, self.memory, self.projected = decoder, memory, None

    def start(self):
        if self.projected is None:
            self.projected = self.decoder.project(self.memory)
        return dict(self.decoder.empty)

    def step(self, tokens: list[int], state):
        return self.decoder.step(tokens[-1], len(tokens) - 1, state, self.projected)


def graph_decoder(directory: Path, config: dict, opener: GraphOpener = GraphOpener()):
    """The decoder an ST artifact's config describes: key/value-caching (`decoder_cache` "keys-values")
    or espnet_onnx's layer-output cache (artifacts written before, and decoders the other cannot export)."""
    kind = config.get("decoder_cache", "layer-outputs")
    decoder = inside(directory, config.get("decoder"), f"{ST_CONFIG_FILE} decoder")
    if kind == "keys-values":
        memory = inside(directory, config.get("decoder_memory"), f"{ST_CONFIG_FILE} decoder_memory")
        return OnnxCachedDecoder(decoder, memory, opener)
    if kind == "layer-outputs":
        return OnnxSTDecoder(decoder, config["decoder_layers"], config["decoder_size"], opener)
    raise ArtifactError(f"{ST_CONFIG_FILE}: unknown decoder_cache {str(kind)[:40]!r} (keys-values or layer-outputs)")


def decoder_files(config: dict) -> list[str]:
    """The graph files of an ST artifact's decoder."""
    return [config["decoder"]] + ([config["decoder_memory"]] if config.get("decoder_cache") == "keys-values" else [])


class OnnxSpeechTranslator:
    """An exported encoder/decoder pair loaded once into sessions of an ONNX runtime (onnxruntime on
    the CPU unless `opener` says; no torch needed)."""

    def __init__(self, directory: str | Path, opener: GraphOpener = GraphOpener()):
        directory = Path(directory)
        self.config = read_json(directory, ST_CONFIG_FILE, "speech-translation config")
        self.sos, self.eos, self.vocab_size = self.config["sos"], self.config["eos"], self.config["vocab_size"]
        self.encoder = opener(inside(directory, self.config.get("encoder"), f"{ST_CONFIG_FILE} encoder"), spinning=False)
        self.decoder = graph_decoder(directory, self.config, opener)
        self.files = [self.config["encoder"], *decoder_files(self.config)]

    def encode(self, feats: np.ndarray) -> np.ndarray:
        return self.encoder.run(["encoder_out"], {"feats": feats.astype(np.float32)})[0]

    def stepper(self, memory: np.ndarray):
        return self.decoder.stepper(memory)

    def decode(self, feats: np.ndarray, max_tokens: int, beam: int = 1) -> list[int]:
        return translate(self, feats, max_tokens, beam)


class OnnxScoringTranslator:
    """The exported pair as a speech-translation evaluation calls a model (`greedy_tokens(feats,
    max_tokens)`: one utterance's greedy tokens, <eos> dropped), so a trained model's BLEU can be
    measured in an ONNX runtime too."""

    def __init__(self, directory: Path, input_names: Sequence[str] = (), opener: GraphOpener = GraphOpener()):
        self.translator = OnnxSpeechTranslator(directory, opener)

    def greedy_tokens(self, feats, max_tokens: int) -> list[int]:
        tokens = self.translator.decode(np.asarray(feats), max_tokens)
        return tokens[:-1] if tokens and tokens[-1] == self.translator.eos else tokens

    def eval(self):
        return self


def decode(stepper, sos: int, eos: int, max_tokens: int, beam: int = 1) -> list[int]:
    """Greedy (beam 1) or beam search over any stepper; returns the tokens after <sos>.

    One algorithm for both runtimes, so that their token sequences can be compared exactly. Beam
    search keeps the `beam` best partial hypotheses by summed log-probability, sets aside those that
    end with <eos>, and stops when `beam` have ended or after `max_tokens`; the best ended hypothesis
    wins (the best unfinished one if none ended).
    """
    if beam < 1 or max_tokens < 1:
        raise UsageError("beam and max_tokens must be >= 1")
    beams = [(0.0, [sos], stepper.start())]
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_tokens):
        candidates = []
        for score, tokens, state in beams:
            logp, new_state = stepper.step(tokens, state)
            for token in np.argsort(-logp, kind="stable")[:beam]:
                candidates.append((score + float(logp[token]), tokens + [int(token)], new_state))
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep their order on both runtimes
        beams = []
        for score, tokens, state in candidates[:beam]:
            if tokens[-1] == eos:
                finished.append((score, tokens))
            else:
                beams.append((score, tokens, state))
        if not beams or len(finished) >= beam:
            break
    best = max(finished or [(score, tokens) for score, tokens, _ in beams], key=lambda c: c[0])
    return best[1][1:]


def translate(translator, feats, max_tokens: int, beam: int = 1) -> list[int]:
    """Encode one utterance's features and decode it with `decode`."""
    return decode(translator.stepper(translator.encode(feats)), translator.sos, translator.eos, max_tokens, beam)


def decode_onnx(directory: str | Path, feats: np.ndarray, max_tokens: int, beam: int = 1, threads: int = 1) -> list[int]:
    """Load an exported pair and decode one utterance (see `OnnxSpeechTranslator` to decode many)."""
    return OnnxSpeechTranslator(directory, GraphOpener(threads=threads)).decode(feats, max_tokens, beam)


def state_after(stepper, prefix: Sequence[int]):
    """The stepper's state once `prefix` has been decoded token by token (what the next step gets)."""
    state = stepper.start()
    for k in range(1, len(prefix) + 1):
        _, state = stepper.step(list(prefix[:k]), state)
    return state


class STSession:
    """A benchmark session over a translator: its timed stages and the outputs compared across runtimes.

    Stages: `encoder` (features -> encoder output), `decoder-step` (one step after `STEP_PREFIX`
    tokens, with their cache) and `greedy` (features -> tokens, end to end: to <eos>, or to ESPnet's
    default length limit, one token per encoder frame (`maxlenratio` 0), which a model that never
    says <eos>, an untrained one, decodes to). Outputs: the encoder output, that step's
    log-probabilities, and the greedy tokens padded with `NO_TOKEN` to the limit.
    """

    #: both translators return host arrays (onnxruntime) or run on the CPU (torch): calls are synchronous
    synchronize = None

    def __init__(self, translator, info, files: Sequence[str]):
        self.translator, self.info, self.files = translator, info, tuple(files)

    def _prefix(self) -> list[int]:
        ordinary = self.translator.vocab_size - 3  # ids 2.. are ordinary tokens; the last is <sos/eos>
        return [self.translator.sos] + [2 + i % ordinary for i in range(STEP_PREFIX)]

    @staticmethod
    def _features(feeds) -> np.ndarray:
        feats = np.asarray(feeds["feats"])
        if feats.shape[0] != 1:
            raise UsageError(f"speech translation decodes one utterance at a time, not a batch of {feats.shape[0]}")
        return feats

    def _step_ready(self, feats: np.ndarray, translator=None):
        """(encoder output, stepper over it, token prefix, the state after all but its last token), of
        this session's translator or of `translator`."""
        translator = translator or self.translator
        memory = translator.encode(feats)
        stepper = translator.stepper(memory)
        prefix = self._prefix()
        return memory, stepper, prefix, state_after(stepper, prefix[:-1])

    def run(self, feeds) -> list[np.ndarray]:
        feats = self._features(feeds)
        memory, stepper, prefix, state = self._step_ready(feats)
        logp, _ = stepper.step(prefix, state)
        limit = max_tokens(memory)
        tokens = translate(self.translator, feats, limit)
        padded = np.full(limit, NO_TOKEN, dtype=np.int64)
        padded[:len(tokens)] = tokens
        # a translator's arrays as numpy: its own `host` where it has one (torch's, for bf16 tensors)
        host = getattr(self.translator, "host", np.asarray)
        return [host(memory), host(logp), padded]

    def stages(self, feeds) -> dict[str, Callable[[], object]]:
        t = self.translator
        feats = self._features(feeds)
        memory, stepper, prefix, state = self._step_ready(feats)
        limit = max_tokens(memory)
        return {
            "encoder": lambda: t.encode(feats),
            "decoder-step": lambda: stepper.step(prefix, state),
            "greedy": lambda: translate(t, feats, limit),
        }


def max_tokens(memory) -> int:
    """ESPnet's default decoding length limit for an utterance: one token per encoder frame."""
    return max(1, int(memory.shape[1]))  # numpy or torch (a bf16 tensor has no numpy view)


#: what `STSession.run` returns, in order
ST_BENCH_OUTPUTS = ("encoder_out", "decoder_logp", "greedy_tokens")


def load_graphs(directory: Path, threads: int, target: Target) -> STSession:
    """The benchmark session of an exported ST artifact in an ONNX runtime (onnxruntime, OpenVINO)."""
    opener = GraphOpener.of(target, threads)
    translator = OnnxSpeechTranslator(directory, opener)
    return STSession(translator, opener.info, translator.files)
