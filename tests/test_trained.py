"""Trained zoo models: recipes, generated tasks, the local corpus, the training cache and its record in
the manifest. Training a zoo model for real takes minutes: those tests are marked `slow` (run them
with `pytest -m slow`); one small model trains in the default run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from deploykit.export.build import export_artifact
from deploykit.model.catalog import get_model
from deploykit.model.spec import InputSpec, ModelSpec, _cache_path
from deploykit.model.training import Recipe, fit
from deploykit.model.zoo.synthetic import SpeechRendering, TopicClassification, TopicText, TranslationTask
from deploykit.prune.base import PruningPlan


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path / "cache"))


def test_recipe_warms_up_linearly_then_decays_to_its_final_share():
    recipe = Recipe(data="x", steps=110, batch=1, lr=1.0, warmup=10, final_lr_share=0.1)
    assert [recipe.lr_at(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert recipe.lr_at(9) == pytest.approx(1.0)
    assert recipe.lr_at(10) == pytest.approx(1.0)
    assert recipe.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert recipe.lr_at(109) == pytest.approx(0.1, abs=1e-3)


def test_topic_text_is_seeded_and_its_cues_are_rare_background_words():
    text = TopicText(vocab=500, classes=3, length=12)
    a, b = text.sample(50, seed=4), text.sample(50, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], text.sample(50, seed=5)[0])
    assert a[0].shape == (50, 12) and int(a[0].min()) >= 1 and int(a[0].max()) < 500
    words, cues = text._tables
    assert set(cues.flatten().tolist()) == set(words[-3 * text.cue_words:].tolist())


def test_translation_maps_each_word_then_reverses_every_run():
    task = TranslationTask(src_words=10, tgt_words=7, reorder=3)
    words = torch.tensor([0, 1, 2, 3, 4])
    d = task.dictionary
    assert task.translate(words).tolist() == [int(d[2]), int(d[1]), int(d[0]), int(d[4]), int(d[3])]


def test_speech_rendering_holds_each_word_for_its_frames():
    speech = SpeechRendering(words=5, feats=8, min_frames=2, max_frames=4, noise=0.0)
    frames = speech.render(torch.tensor([3, 3, 1]), torch.Generator().manual_seed(0))
    assert 6 <= len(frames) <= 12 and frames.shape[1] == 8
    assert torch.equal(frames[0], speech.prototypes[3]) and torch.equal(frames[-1], speech.prototypes[1])


def test_a_trained_classifier_beats_chance_by_far():
    task = TopicClassification(TopicText(vocab=300, classes=2, length=20, cue_words=10, cue_rate=0.2),
                               train_size=2000, test_size=500, encoding="bag")
    model = nn.Sequential(nn.Linear(300, 32), nn.ReLU(), nn.Linear(32, 2))
    before = task.accuracy(model)["accuracy"]
    task.train(model, recipe=Recipe(data=task.describe(), steps=300, batch=32, lr=3e-3))
    assert task.accuracy(model)["accuracy"] > max(0.85, before + 0.2)


def _tiny_trained_spec(calls: list) -> ModelSpec:
    task = TopicClassification(TopicText(vocab=64, classes=2, length=8, cue_words=4, cue_rate=0.3),
                               train_size=256, test_size=128, encoding="bag")
    recipe = Recipe(data=task.describe(), steps=40, batch=16, lr=5e-3)

    def train(model, after_step=None):
        calls.append("train")
        task.train(model, recipe=recipe, after_step=after_step)

    return ModelSpec(name="tiny-trained", build=lambda: nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2)),
                     inputs=(InputSpec("bow", ("batch", 64)),), outputs=("logits",), train=train,
                     evaluate=task.accuracy, recipe=recipe, sampler=task.sample)


def test_training_is_cached_with_its_recipe_and_result():
    calls: list = []
    spec = _tiny_trained_spec(calls)
    first = spec.make()
    second = spec.make()
    assert calls == ["train"]  # the second came from the cache
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    record = spec.training_record(second)
    assert record["recipe"] == spec.recipe.record()
    assert record["result"] == pytest.approx(spec.evaluate(first))
    assert record["train_seconds"] >= 0


def test_a_damaged_training_record_is_scored_again_not_believed():
    spec = _tiny_trained_spec([])
    model = spec.make()
    sidecar = _cache_path(spec).with_suffix(".json")
    sidecar.write_text(json.dumps({"recipe": None, "result": {"accuracy": "1.0; drop table"}}))
    assert spec.training_record(model)["result"] == pytest.approx(spec.evaluate(model))
    sidecar.write_text("{not json")
    assert spec.training_record(model)["result"] == pytest.approx(spec.evaluate(model))


def test_a_recipe_change_trains_again():
    calls: list = []
    spec = _tiny_trained_spec(calls)
    spec.make()
    changed = ModelSpec(**{**spec.__dict__, "recipe": Recipe(data="other", steps=40, batch=16, lr=5e-3)})
    changed.make()
    assert calls == ["train", "train"]


def test_the_manifest_carries_the_recipe_and_the_quality_before_and_after_pruning(tmp_path):
    spec = _tiny_trained_spec([])
    result = export_artifact(spec, PruningPlan(method="magnitude", amount=0.5), "dense", tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["training"]["recipe"] == spec.recipe.record()
    assert set(manifest["training"]["result"]) == {"accuracy"} == set(manifest["metrics"])
    assert result.manifest.training == manifest["training"]


def test_corpus_tokenizer_is_deterministic_and_held_out_text_is_apart():
    pytest.importorskip("tokenizers")
    from deploykit.model.zoo import corpus

    train, held = corpus.token_ids(300)
    assert len(train) > 5 * len(held) > 0
    assert int(train.max()) < 300 and int(held.max()) < 300
    corpus.tokenizer.cache_clear()
    corpus.token_ids.cache_clear()
    assert torch.equal(corpus.token_ids(300)[1], held)


def test_an_untrained_language_model_is_about_as_perplexed_as_its_vocabulary():
    pytest.importorskip("transformers")
    spec = get_model("gpt2-tiny-trained")
    quality = spec.evaluate(spec.make(trained=False))
    assert 0.5 * 1000 < quality["perplexity"] < 2 * 1000
    assert 0 <= quality["token_accuracy"] < 0.05
    prompt = spec.example_inputs(2)[0]
    assert prompt.shape == (2, 16) and int(prompt.max()) < 1000


def test_trained_translation_model_samples_its_task_and_scores_bleu():
    pytest.importorskip("sacrebleu")
    spec = get_model("seq2seq-transformer-small-trained")
    src, tgt = spec.example_inputs(2)
    assert src.shape == (2, 16) and tgt.shape == (2, 12) and bool((tgt[:, 0] == 1).all())
    assert 0 <= spec.evaluate(spec.make(trained=False))["bleu"] < 5


@pytest.mark.slow
@pytest.mark.parametrize("name, metric, floor", [
    ("mlp-sst2-trained", "accuracy", 0.8), ("textclf-agnews-small-trained", "accuracy", 0.8),
    ("gpt2-tiny-trained", "token_accuracy", 0.2), ("seq2seq-transformer-small-trained", "bleu", 50),
    ("espnet-st-small-trained", "bleu", 30)])
def test_zoo_models_train_to_a_useful_quality(name, metric, floor):
    spec = get_model(name)
    model = spec.make()
    assert spec.training_record(model)["result"][metric] > floor


def test_a_trained_zoo_models_pipeline_inputs_come_from_its_task():
    from types import SimpleNamespace

    from deploykit.pipelines.base import has_task_inputs, task_inputs

    def manifest(model, kind="zoo"):
        return SimpleNamespace(model=model, source={"kind": kind})

    assert has_task_inputs(manifest("gpt2-tiny-trained"))
    assert not has_task_inputs(manifest("gpt2-tiny"))  # random weights: random prompts
    assert not has_task_inputs(manifest("gpt2-tiny-trained", kind="hf-directory"))
    prompt = task_inputs(manifest("gpt2-tiny-trained"), seed=3, length=16)
    assert prompt[0].shape == (1, 16) and task_inputs(manifest("gpt2-tiny"), 3, 16) is None
