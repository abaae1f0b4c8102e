"""Greedy decoding with an exported encoder-decoder (T5, BART, ...) in an ONNX runtime (no torch needed).

An artifact of the "text2text-generation" pipeline holds optimum's three graphs
(`deploykit.pipelines.hf_generation`): `encoder.onnx` (source ids -> hidden states), `decoder.onnx`
(the first step: start token and the encoder's states -> logits, the self- and cross-attention
caches) and `decoder_with_past.onnx` (one token and the caches -> logits and the extended
self-attention cache; the cross-attention cache is the first step's, reused).
`text2text_config.json` names them. `OnnxSeq2SeqLM` has the `prefill`/`step` interface of
`deploykit.model.causal_lm.greedy`, so the text-generation pipeline's `GenerationSession` runs it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploykit.convert.shared_weights import with_shared_weights
from deploykit.core.confine import inside, read_json
from deploykit.core.errors import ArtifactError
from deploykit.pipelines.textgen import GenerationSession, recorded_positions
from deploykit.runtime.graphs import GraphOpener
from deploykit.runtime.session import Target

T2T_CONFIG_FILE = "text2text_config.json"
ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE = "encoder.onnx", "decoder.onnx", "decoder_with_past.onnx"
#: config key -> file, in the order the graphs run
GRAPH_KEYS = {"encoder": ENCODER_FILE, "decoder": DECODER_FILE, "decoder_with_past": DECODER_WITH_PAST_FILE}


def _outputs(session, feeds: dict) -> dict[str, np.ndarray]:
    taken = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in taken})))


class OnnxSeq2SeqLM:
    """The three graphs in sessions of an ONNX runtime (onnxruntime on the CPU unless `opener` says);
    states are (caches, source mask), never changed in place."""

    def __init__(self, directory: str | Path, opener: GraphOpener = GraphOpener()):
        self.directory = Path(directory)
        self.config = read_json(self.directory, T2T_CONFIG_FILE, "text2text-generation config")
        self.eos, self.start = self.config.get("eos"), self.config.get("decoder_start")
        if not isinstance(self.start, int) or isinstance(self.start, bool) or self.start < 0:  # read from a file
            raise ArtifactError(f"{str(self.directory)!r}: {T2T_CONFIG_FILE} has no valid decoder_start")
        self.max_positions, self.prompt_takes_positions = recorded_positions(self.config), False
        self.sessions = {key: opener(inside(self.directory, self.config.get(key), f"{T2T_CONFIG_FILE} {key}"))
                         for key in GRAPH_KEYS}
        self.past_names = [i.name for i in self.sessions["decoder_with_past"].get_inputs()
                           if i.name.startswith("past_key_values.")]

    def _caches(self, outputs: dict, previous: dict) -> dict[str, np.ndarray]:
        # a present.* output replaces its past_key_values.* input; those not output stay (cross-attention)
        return {name: outputs.get(name.replace("past_key_values.", "present."), previous.get(name))
                for name in self.past_names}

    def prefill(self, prompt: np.ndarray):
        ids = np.asarray(prompt, dtype=np.int64)
        mask = np.ones_like(ids)
        hidden = _outputs(self.sessions["encoder"], {"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
        out = _outputs(self.sessions["decoder"], {"input_ids": np.array([[self.start]], dtype=np.int64),
                                                  "encoder_hidden_states": hidden, "encoder_attention_mask": mask})
        return out["logits"][0, -1], (self._caches(out, {}), mask)

    def step(self, token: int, state):
        past, mask = state
        out = _outputs(self.sessions["decoder_with_past"],
                       {"input_ids": np.array([[token]], dtype=np.int64), "encoder_attention_mask": mask, **past})
        return out["logits"][0, -1], (self._caches(out, past), mask)


def load_graphs(directory: Path, threads: int, target: Target) -> GenerationSession:
    """The benchmark session of a text2text-generation artifact in an ONNX runtime (onnxruntime, OpenVINO)."""
    opener = GraphOpener.of(target, threads)
    lm = OnnxSeq2SeqLM(directory, opener)
    return GenerationSession(lm, opener.info, with_shared_weights(directory, [lm.config[key] for key in GRAPH_KEYS]))
