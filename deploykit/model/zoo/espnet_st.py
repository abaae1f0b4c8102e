"""ESPnet speech-translation models (SST-2 study's ST experiments), built from the YAML presets beside
this file with `STTask.build_model`, or read from a real experiment directory or zip. Needs the
`espnet` extra.

Their ONNX form is an encoder/decoder pair, not one forward pass: the specs name the
"speech-translation" pipeline (`deploykit.pipelines.speech_translation`), which exports and runs them. Plans address module groups by
name pattern (`MODULE_GROUPS`); the study's best plan is `espnet/best_plan.toml`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.core.confine import check_named_paths, inside, read_json
from deploykit.core.errors import ArtifactError
from deploykit.core.fsutil import read_text, scratch_directory, write_text_atomic
from deploykit.model.artifact import ST_CONFIG_FILE
from deploykit.model.espnet import build_st_model, feats_dim, load_st_experiment
from deploykit.model.spec import InputSpec, ModelSpec, register_model

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
#: files an artifact exported from an experiment carries to rebuild the model
CONFIG_FILE = "espnet_config.yaml"
STATS_FILE = "feats_stats.npz"


def _config(preset: str) -> dict:
    import yaml

    return yaml.safe_load((PRESETS / f"{preset}.yaml").read_text(encoding="utf-8"))


def _build(preset: str) -> nn.Module:
    return build_st_model(_config(preset))


def _sampler(feats: int):
    def sample(batch: int, generator: torch.Generator) -> tuple[torch.Tensor]:
        return (torch.randn(batch, 200, feats, generator=generator),)  # 2 s of 10 ms frames

    return sample


def _st_fields(feats: int) -> dict[str, Any]:
    return dict(inputs=[InputSpec("feats", ("batch", "frames", feats))], outputs=["encoder_out", "decoder_logp"],
                sampler=_sampler(feats), output_layers=["decoder.output_layer"], 
                forms=("dense", "csr", "dense-shrunk"), pipeline="speech-translation")


@register_model("espnet-st", **_st_fields(FEATS))
def espnet_st() -> nn.Module:
    """ESPnet ST (SST-2 study): Conformer 6 x 256 encoder (conv2d subsampling, rel-pos attention, macaron FF, conv module), Transformer 3-layer decoder, vocabulary 1000, 16,622,312 parameters."""
    return _build("st_large")


@register_model("espnet-st-small", **_st_fields(FEATS))
def espnet_st_small() -> nn.Module:
    """ESPnet ST, small preset for CI: Conformer 2 x 64 encoder, Transformer 2-layer decoder, vocabulary 64, 361,024 parameters."""
    return _build("st_small")


# -- real experiments ------------------------------------------------------------------------------

def is_experiment(path: Path) -> bool:
    """A zip (checked when read), or a directory holding a config.yaml somewhere below it."""
    return path.suffix == ".zip" and path.is_file() or path.is_dir() and any(path.rglob("config.yaml"))


def _spec(name: str, build, feats: int, description: str, bundle=None) -> ModelSpec:
    return ModelSpec(name=name, build=build, description=description, bundle=bundle, **_st_fields(feats))


def experiment_spec(path: Path) -> ModelSpec:
    """A spec for a real ESPnet ST experiment: its trained weights, exported as features-in encoder + decoder."""
    with scratch_directory("espnet") as tmp:
        model, config = load_st_experiment(path, tmp)
    return _spec(path.stem if path.suffix == ".zip" else path.name, lambda: copy.deepcopy(model),
                 feats_dim(model, config), f"ESPnet ST experiment {path}",
                 bundle=lambda directory, _shipped: _bundle(model, config, directory, path))


def _bundle(model: nn.Module, config: dict, directory: Path, path: Path) -> dict:
    """Write the experiment's config (and normalisation statistics) into an artifact directory.

    GlobalMVN reads its statistics file when built; its mean and std are also buffers in the
    weights, so the file written here, from those buffers, only has to give them their shapes.
    """
    import numpy as np
    import yaml

    config = copy.deepcopy(config)
    stats = getattr(model.normalize, "mean", None)
    if stats is not None:
        mean, std = model.normalize.mean.numpy(), model.normalize.std.numpy()
        np.savez(directory / STATS_FILE, count=np.array(1.0), sum=mean, sum_square=std ** 2 + mean ** 2)
        config["normalize_conf"] = {**config.get("normalize_conf", {}), "stats_file": STATS_FILE}
    write_text_atomic(directory / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    return {"kind": "espnet-experiment", "config": CONFIG_FILE, "from": str(path)}


def spec_from_artifact(directory: Path, manifest) -> ModelSpec:
    """Rebuild an experiment's spec from the config its artifact carries (weights come from the artifact)."""
    import yaml

    config_path = inside(directory, manifest.source.get("config"), "manifest source.config")
    config = yaml.safe_load(read_text(config_path, "ESPnet config", ArtifactError))
    if not isinstance(config, dict):
        raise ArtifactError(f"{str(config_path)!r} is not an ESPnet config (not a mapping)")
    check_named_paths(config, directory, str(config_path))
    stats = (config.get("normalize_conf") or {}).get("stats_file")
    if stats is not None:
        config["normalize_conf"]["stats_file"] = str(inside(directory, stats, "normalize_conf.stats_file"))
    # the feature width export recorded, rather than building a model only to ask it
    st_config = read_json(directory, ST_CONFIG_FILE, "speech-translation config")
    return _spec(manifest.model, lambda: build_st_model(config), st_config["feats_dim"],
                 f"ESPnet ST experiment {manifest.source.get('from', '')}")
