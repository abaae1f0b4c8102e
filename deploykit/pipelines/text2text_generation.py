"""The `text2text-generation` pipeline: an encoder-decoder language model (T5, BART, ...) decoded
token by token.

Exported through optimum by `deploykit.pipelines.hf_generation` (the encoder and the decoder with and
without its cache; greedy tokens checked against PyTorch exactly), decoded by
`deploykit.pipelines.seq2seq_decode` under onnxruntime or OpenVINO and by the transformers model under PyTorch.
Everything else is the text-generation pipeline's: the exporter and the PyTorch session pick the
encoder-decoder side by the model, and a benchmark feeds one random source sentence and times
encoding with the first decoder step ("prompt"), one cached step and greedy generation.
"""

from __future__ import annotations

import dataclasses

from deploykit.pipelines import seq2seq_decode, textgen
from deploykit.pipelines.base import PIPELINES
from deploykit.pipelines.text_generation import TEXT_GENERATION

TEXT2TEXT_GENERATION = PIPELINES.add("text2text-generation", dataclasses.replace(
    TEXT_GENERATION, name="text2text-generation",
    description="an encoder-decoder language model: encoder, decoder with and without its cache",
    loaders={**TEXT_GENERATION.loaders, "onnxruntime": seq2seq_decode.load_graphs, "openvino": seq2seq_decode.load_graphs},
    inputs=textgen.prompt_inputs(seq2seq_decode.T2T_CONFIG_FILE, "text-to-text generation"),
    # the cost of a pass depends on how many tokens it decodes, which one traced pass does not say
    one_pass=False))
