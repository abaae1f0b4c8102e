"""ESPnet speech-translation models (SST-2 study's ST experiments), built from the YAML presets beside
this file with `STTask.build_model`, or read from a real experiment directory or zip. Needs the
`espnet` extra.

Their ONNX form is an encoder/decoder pair, not one forward pass: the specs name the
"speech-translation" pipeline (`deploykit.pipelines.speech_translation`), which exports and runs them. Plans address module groups by
name pattern (`MODULE_GROUPS`); the study's best plan is `espnet/best_plan.toml`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.core.confine import check_named_paths, inside, read_json
from deploykit.core.errors import ArtifactError
from deploykit.core.fsutil import read_text, scratch_directory, write_text_atomic
from deploykit.model.artifact import ST_CONFIG_FILE
from deploykit.model.calibration import CALIBRATION_SEED
from deploykit.model.espnet import build_st_model, encode_features, feats_dim, load_st_experiment, sos_eos
from deploykit.model.spec import InputSpec, ModelSpec, register_model
from deploykit.model.training import Recipe, fit
from deploykit.model.zoo.synthetic import SpeechRendering, TranslationTask, bleu_of_ids

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
                forms=("dense", "csr", "bsr", "dense-shrunk"), pipeline="speech-translation", extra="espnet")


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


# -- trained on a generated speech-translation task ----------------------------------------------------

#: ESPnet's token layout: 0 blank, 1 unk, the words, the last id sos/eos
FIRST_TOKEN = 2
#: source words per training utterance (about 0.3 to 5.5 s of 10 ms frames at 16 frames a word)
TRAIN_WORDS = (2, 34)
#: held-out utterances of 5 s that BLEU is measured on
EVAL_UTTERANCES, EVAL_FRAMES = 16, 500


@dataclass(frozen=True)
class SpeechTranslationTask:
    """A `TranslationTask` whose sources are rendered as features, in an ESPnet vocabulary of `vocab`."""

    translation: TranslationTask
    speech: SpeechRendering

    @classmethod
    def for_vocabulary(cls, vocab: int, source_words: int, reorder: int = 1) -> "SpeechTranslationTask":
        words = vocab - FIRST_TOKEN - 1  # blank, unk and sos/eos are not words
        return cls(TranslationTask(source_words, words, reorder=reorder),
                   SpeechRendering(source_words, FEATS, min_frames=12, max_frames=20))

    def describe(self) -> str:
        return f"{self.translation.describe()}; {self.speech.describe()}"

    @property
    def sos_eos(self) -> int:
        """The vocabulary's last id, ESPnet's sos and eos (after blank, unk and the words)."""
        return FIRST_TOKEN + self.translation.tgt_words

    def utterance(self, words: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (frames, FEATS), reference token ids)."""
        source = self.translation.sentence(words, g)
        return self.speech.render(source, g), self.translation.translate(source) + FIRST_TOKEN

    def batch(self, count: int, g: torch.Generator):
        """ESPnet's training inputs: padded features and lengths, padded token ids (-1) and lengths."""
        pairs = [self.utterance(int(torch.randint(TRAIN_WORDS[0], TRAIN_WORDS[1] + 1, (1,), generator=g)), g)
                 for _ in range(count)]
        feats = nn.utils.rnn.pad_sequence([f for f, _ in pairs], batch_first=True)
        text = nn.utils.rnn.pad_sequence([t for _, t in pairs], batch_first=True, padding_value=-1)
        return (feats, torch.tensor([len(f) for f, _ in pairs]), text, torch.tensor([len(t) for _, t in pairs]))

    def train(self, model: nn.Module, *, recipe: Recipe, after_step=None) -> None:
        fit(model, recipe, lambda g: self.batch(recipe.batch, g), lambda m, b: m(*b)[0], after_step)

    def bleu(self, model: nn.Module) -> dict[str, float]:
        """BLEU of greedy decoding on EVAL_UTTERANCES held-out utterances of EVAL_FRAMES frames."""
        g = torch.Generator().manual_seed(3)
        hypotheses, references = [], []
        for _ in range(EVAL_UTTERANCES):
            feats, reference = self.utterance(self.speech.words_for(EVAL_FRAMES), g)
            hypotheses.append(greedy_tokens(model, feats.unsqueeze(0), len(reference) + 10))
            references.append(reference.tolist())
        return {"bleu": bleu_of_ids(hypotheses, references)}

    def features(self, batch: int, g: torch.Generator, frames: int = 200) -> tuple[torch.Tensor]:
        """`batch` utterances of exactly `frames` frames, each a sentence rendered long enough and cut
        there: a batch's rows differ (a parity check on copies of one utterance would prove nothing)."""
        words = -(-frames // self.speech.min_frames)
        return (torch.stack([self.utterance(words, g)[0][:frames] for _ in range(batch)]),)


def greedy_tokens(model: nn.Module, feats: torch.Tensor, max_tokens: int) -> list[int]:
    """Greedy decoding of one utterance with ESPnet's decoder and its cache; eos not included. A model
    that decodes itself (an onnxruntime stand-in, `greedy_tokens(feats, max_tokens)`) is asked to."""
    if hasattr(model, "greedy_tokens"):
        return model.greedy_tokens(feats, max_tokens)
    from espnet.nets.pytorch_backend.transformer.mask import subsequent_mask

    eos = sos_eos(model)
    with torch.no_grad():
        memory = encode_features(model, feats)
        ys, cache = [eos], None
        for _ in range(max_tokens):
            tokens = torch.tensor([ys])
            logp, cache = model.decoder.forward_one_step(tokens, subsequent_mask(len(ys)).unsqueeze(0), memory,
                                                         cache=cache)
            token = int(logp[0].argmax())
            if token == eos:
                break
            ys.append(token)
    return ys[1:]


def _calibration(task: SpeechTranslationTask, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Calibration batches, one whole utterance each (of the training lengths, unpadded): its features and,
    for the decoder to read as it does when translating, sos and the reference translation (the trace
    forward teacher-forces a second input); the same draw every time."""
    g = torch.Generator().manual_seed(CALIBRATION_SEED)
    batches = []
    for _ in range(count):
        feats, reference = task.utterance(int(torch.randint(TRAIN_WORDS[0], TRAIN_WORDS[1] + 1, (1,), generator=g)), g)
        prefix = torch.cat([torch.tensor([task.sos_eos]), reference]).unsqueeze(0)
        batches.append((feats.unsqueeze(0), prefix))
    return batches


def _trained_st_fields(task: SpeechTranslationTask, recipe: Recipe) -> dict[str, Any]:
    fields = _st_fields(FEATS)
    fields.update(sampler=task.features, length_sampler=task.features, train=partial(task.train, recipe=recipe),
                  evaluate=task.bleu, recipe=recipe, calibration=partial(_calibration, task))
    return fields


def _build_for_training(preset: str) -> nn.Module:
    """The preset with its decoder's token embedding drawn at d^-1/2: ESPnet scales embeddings by sqrt(d)
    before adding positions, and torch's N(0, 1) initialisation would drown them (what ESPnet recipes'
    `init:` option avoids); the decoder then cannot learn to align in minutes."""
    model = _build(preset)
    embedding = model.decoder.embed[0]
    nn.init.normal_(embedding.weight, 0.0, embedding.embedding_dim ** -0.5)
    return model


ST_SMALL_TASK = SpeechTranslationTask.for_vocabulary(64, source_words=48)


@register_model("espnet-st-small-trained", **_trained_st_fields(
    ST_SMALL_TASK, Recipe(data=ST_SMALL_TASK.describe(), steps=1500, batch=8, lr=2e-3, warmup=80)))
def espnet_st_small_trained() -> nn.Module:
    """espnet-st-small trained on a generated speech-translation task (source words as feature frames; about 5 minutes)."""
    return _build_for_training("st_small")


#: the small model's task (48 source words) in the large model's vocabulary; at d 256 x 6 layers it
#: learns with a lower learning rate and a longer warm-up than the small model (lr 1e-3 and 2e-3 left
#: it predicting the target words' unigram distribution, its decoder not attending to the source), and
#: on the whole range of utterance lengths (trained on up to 14 words, it decoded ~11 tokens whatever
#: the length)
ST_LARGE_TASK = SpeechTranslationTask.for_vocabulary(1000, source_words=48)


@register_model("espnet-st-trained", **_trained_st_fields(
    ST_LARGE_TASK, Recipe(data=ST_LARGE_TASK.describe(), steps=1200, batch=8, lr=5e-4, warmup=300)))
def espnet_st_trained() -> nn.Module:
    """espnet-st trained on a generated speech-translation task (48 source words as feature frames, in its 1000-token vocabulary; about an hour on 2 cores)."""
    return _build_for_training("st_large")
