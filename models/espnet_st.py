"""ESPnet speech-translation models (SST-2 study's ST experiments), built from the YAML presets beside
this file with `STTask.build_model`. Random weights; needs the `espnet` extra.

Their ONNX form is an encoder/decoder pair (see `deploykit.espnet`), not one forward pass, so the
specs carry their own exporter. Plans address module groups by name pattern (`MODULE_GROUPS`); the
study's best plan is `espnet/best_plan.toml`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deploykit.spec import InputSpec, register_model

PRESETS = Path(__file__).parent / "espnet"
FEATS = 80
#: module groups of an ST model for plans and sensitivity sweeps: group -> name pattern
MODULE_GROUPS = {
    "encoder.subsampling": "encoder.embed.*",
    "encoder.conv": "encoder.encoders.*.conv_module.*",
    "encoder.feed_forward": "encoder.encoders.*.feed_forward*",
    "encoder.self_attention": "encoder.encoders.*.self_attn.*",
    "decoder.embedding": "decoder.embed.*",
    "decoder.self_attention": "decoder.decoders.*.self_attn.*",
    "decoder.cross_attention": "decoder.decoders.*.src_attn.*",
    "decoder.feed_forward": "decoder.decoders.*.feed_forward.*",
}


def _config(preset: str) -> dict:
    import yaml

    return yaml.safe_load((PRESETS / f"{preset}.yaml").read_text(encoding="utf-8"))


def _build(preset: str) -> nn.Module:
    from deploykit.espnet import build_st_model

    return build_st_model(_config(preset))


def _export(model: nn.Module, directory: Path, opset: int, tolerance: float, sparse: bool):
    from deploykit.espnet import export_st

    result = export_st(model, directory, FEATS, opset=opset, tolerance=tolerance, sparse=sparse)
    errors = {"encoder_out": result.encoder_max_abs_error, "decoder_logp": result.decoder_max_abs_error}
    return errors, result.sparse_initializers


def _features(batch: int, generator: torch.Generator) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 200, FEATS, generator=generator),)  # 2 s of 10 ms filterbank frames


_COMMON = dict(inputs=[InputSpec("feats", ("batch", "frames", FEATS))], outputs=["encoder_out", "decoder_logp"],
               sampler=_features, output_layers=["decoder.output_layer"], export=_export, forms=("dense", "csr"))


@register_model("espnet-st", **_COMMON)
def espnet_st() -> nn.Module:
    """ESPnet ST (SST-2 study): Conformer 6 x 256 encoder (conv2d subsampling, rel-pos attention, macaron FF, conv module), Transformer 3-layer decoder, vocabulary 1000, 16,622,312 parameters."""
    return _build("st_large")


@register_model("espnet-st-small", **_COMMON)
def espnet_st_small() -> nn.Module:
    """ESPnet ST, small preset for CI: Conformer 2 x 64 encoder, Transformer 2-layer decoder, vocabulary 64, 361,024 parameters."""
    return _build("st_small")
