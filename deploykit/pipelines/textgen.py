"""Text generation with an exported causal language model in an ONNX runtime: onnxruntime or OpenVINO (no torch needed).

An artifact of the "text-generation" pipeline holds two graphs exported by optimum
(`deploykit.pipelines.hf_generation`): `decoder_with_past.onnx` takes the key/value cache of the tokens so far and
returns it extended (optimum's "text-generation-with-past" task), and `decoder.onnx` recomputes the
whole sequence (task "text-generation"; used for perplexity). `textgen_config.json` names them.

`greedy` (`deploykit.model.causal_lm`) decodes with any model that has `prefill(prompt) -> (logits, state)` and
`step(token, state) -> (logits, state)`: `OnnxCausalLM` here, `deploykit.model.hf.TorchCausalLM` for
PyTorch. States are never changed in place, so one state can be stepped from again and again (the
benchmark's decode-step stage does exactly that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from deploykit.convert.shared_weights import with_shared_weights
from deploykit.core.confine import inside, read_json
from deploykit.core.errors import UsageError
from deploykit.model.causal_lm import greedy, next_token_agreement, room, scores_sequences
from deploykit.pipelines.base import task_inputs
from deploykit.runtime.graphs import GraphOpener
from deploykit.runtime.session import RuntimeInfo, Target

TEXTGEN_CONFIG_FILE = "textgen_config.json"
WITH_PAST_FILE = "decoder_with_past.onnx"
NO_PAST_FILE = "decoder.onnx"
#: prompt length of benchmark inputs, and new tokens of the generate stage (the GPT-2 study's setting)
BENCH_PROMPT = 16
BENCH_NEW_TOKENS = 64
#: greedy tokens pad value after an end-of-sequence token
NO_TOKEN = -1
#: what `GenerationSession.run` returns, in order
TEXTGEN_OUTPUTS = ("prompt_logits", "step_logits", "greedy_tokens")


def recorded_positions(config: dict) -> int | None:
    """The model's position limit a generation config records (None: none recorded, or relative)."""
    value = config.get("max_positions")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else None


class OnnxCausalLM:
    """The exported graphs in sessions of an ONNX runtime (onnxruntime on the CPU unless `opener` says):
    the cached one at once, the full-sequence one when first needed (generation never needs it, and
    it would double the memory figure)."""

    def __init__(self, directory: str | Path, opener: GraphOpener = GraphOpener()):
        self.directory, self.opener = Path(directory), opener
        self.config = read_json(self.directory, TEXTGEN_CONFIG_FILE, "text-generation config")
        self.eos = self.config.get("eos")
        self.max_positions = recorded_positions(self.config)
        self.vocab_size = self.config.get("vocab_size")
        self.with_past = opener(inside(self.directory, self.config.get("with_past"), f"{TEXTGEN_CONFIG_FILE} with_past"))
        self._no_past = None
        inputs = self.with_past.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        # (heads, head size) per cache input: fixed dimensions of the exported graph
        self.empty_past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
                           for i in inputs if i.name in self.past_names}
        self.output_names = [o.name for o in self.with_past.get_outputs()]
        # position ids where the architecture's graph takes them (GPT-2, Llama; not every family)
        self.takes_positions = any(i.name == "position_ids" for i in inputs)

    def _run(self, ids: np.ndarray, past: dict[str, np.ndarray], start: int):
        length = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, start + length), dtype=np.int64), **past}
        if self.takes_positions:
            feeds["position_ids"] = np.arange(start, start + length, dtype=np.int64)[None]
        outputs = dict(zip(self.output_names, self.with_past.run(None, feeds)))
        present = {name: outputs[name.replace("past_key_values.", "present.")] for name in self.past_names}
        return outputs["logits"][0, -1], (present, start + length)

    def prefill(self, prompt: np.ndarray):
        return self._run(prompt, self.empty_past, 0)

    def step(self, token: int, state):
        past, length = state
        return self._run(np.array([[token]], dtype=np.int64), past, length)

    @property
    def no_past(self):
        if self._no_past is None:
            self._no_past = self.opener(inside(self.directory, self.config.get("no_past"), f"{TEXTGEN_CONFIG_FILE} no_past"))
        return self._no_past

    def logits(self, ids: np.ndarray) -> np.ndarray:
        length = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.arange(length, dtype=np.int64)[None].repeat(ids.shape[0], axis=0)}
        names = {i.name for i in self.no_past.get_inputs()}
        return self.no_past.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


class OnnxLogits:
    """The full-sequence graph called like the PyTorch model (input ids -> logits tensor), so that a
    language model's evaluation (perplexity over held-out text) can score it; `causal_lm` is the
    `deploykit.model.causal_lm` interface for evaluations that use it."""

    def __init__(self, directory: Path, input_names: Sequence[str] = (), opener: GraphOpener = GraphOpener()):
        self.causal_lm = OnnxCausalLM(directory, opener)

    def __call__(self, input_ids):
        import torch  # torch side: the evaluation hands tensors

        return torch.from_numpy(self.causal_lm.logits(input_ids.detach().cpu().numpy()))

    def eval(self):
        return self


def prompt_inputs(config_file: str, what: str):
    """A benchmark's inputs for a generating pipeline (`what`) whose config (`config_file`, with
    "vocab_size") the artifact carries: one prompt of BENCH_PROMPT tokens, or `length`: held-out text for
    a trained zoo model, else random token ids."""

    def inputs(directory: Path, manifest, batch: int, seed: int, length: int | None) -> dict:
        if batch != 1:
            raise UsageError(f"{manifest.model}: {what} decodes one prompt at a time; use batch 1")
        vocab = read_json(directory, config_file, f"{what} config").get("vocab_size")
        if not isinstance(vocab, int) or vocab < 1:
            raise UsageError(f"{manifest.model}: {config_file} has no valid vocab_size")
        prompt = length or BENCH_PROMPT
        task = task_inputs(manifest, seed, prompt)
        if task is not None:
            return {"input_ids": task[0]}
        return {"input_ids": np.random.default_rng(seed).integers(0, vocab, (1, prompt), dtype=np.int64)}

    return inputs


class GenerationSession:
    """A benchmark session over a causal LM: stages `prompt` (the prompt in one pass, filling the
    cache), `decode-step` (one token after the prompt, with its cache) and `generate`
    (`BENCH_NEW_TOKENS` greedy tokens, end to end). Outputs: the prompt's last logits, the step's
    logits, and the greedy tokens padded with `NO_TOKEN`."""

    #: both language models return host arrays or run on the CPU: calls are synchronous
    synchronize = None

    def __init__(self, lm, info: RuntimeInfo, files: Sequence[str], new_tokens: int = BENCH_NEW_TOKENS):
        self.lm, self.info, self.files, self.new_tokens = lm, info, tuple(files), new_tokens

    def _prompt(self, feeds) -> np.ndarray:
        ids = np.asarray(feeds["input_ids"], dtype=np.int64)
        if ids.shape[0] != 1:
            raise UsageError(f"text generation decodes one prompt at a time, not a batch of {ids.shape[0]}")
        room(self.lm, ids.shape[1])  # a prompt longer than the model's positions: one line, not an IndexError
        return ids

    def run(self, feeds) -> list[np.ndarray]:
        prompt = self._prompt(feeds)
        logits, state = self.lm.prefill(prompt)
        step_logits, _ = self.lm.step(int(np.argmax(logits)), state)
        tokens = greedy(self.lm, prompt[0].tolist(), self.new_tokens, self.lm.eos)
        padded = np.full(self.new_tokens, NO_TOKEN, dtype=np.int64)
        padded[:len(tokens)] = tokens
        return [np.asarray(logits), np.asarray(step_logits), padded]

    def next_token_agreement(self, feeds, tokens: np.ndarray) -> float | None:
        """Share of `tokens` (another model's greedy tokens after this prompt, as `run` returns them:
        padded with NO_TOKEN) that this model predicts after the same prefix; None where its model cannot
        score a sequence in one pass (an encoder-decoder)."""
        if not scores_sequences(self.lm):
            return None
        tokens = np.asarray(tokens)
        return next_token_agreement(self.lm, self._prompt(feeds)[0].tolist(), tokens[tokens != NO_TOKEN].tolist())

    def stages(self, feeds) -> dict[str, Callable[[], object]]:
        lm, prompt = self.lm, self._prompt(feeds)
        logits, state = lm.prefill(prompt)
        token = int(np.argmax(logits))
        ids = prompt[0].tolist()
        return {
            "prompt": lambda: lm.prefill(prompt),
            "decode-step": lambda: lm.step(token, state),
            "generate": lambda: greedy(lm, ids, self.new_tokens, lm.eos),
        }


def load_graphs(directory: Path, threads: int, target: Target) -> GenerationSession:
    """The benchmark session of a text-generation artifact in an ONNX runtime (onnxruntime, OpenVINO)."""
    opener = GraphOpener.of(target, threads)
    lm = OnnxCausalLM(directory, opener)
    return GenerationSession(lm, opener.info, with_shared_weights(directory, [lm.config["with_past"], lm.config["no_past"]]))
