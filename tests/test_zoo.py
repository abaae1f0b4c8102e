"""Every zoo model builds, prunes, converts, exports and passes parity."""

import pytest

from deploykit.export.build import export_artifact
from deploykit.model.catalog import list_models
from deploykit.model.summary import count_parameters
from deploykit.prune.base import PruningPlan

# Parameter counts the model docstrings cite (from the studies' shapes).
PARAMETERS = {
    "mlp-sst2": 1_412_354,
    "lenet-300-100": 266_610,
    "lenet-5": 61_706,
    "vae": 652_824,
    "resnet18": 11_173_962,
    "resnet50": 23_520_842,
    "textclf-agnews": 6_132_164,
    "seq2seq-transformer": 33_570_389,
    "gpt2-small": 124_439_808,
    "gpt2-tiny": 180_480,
    "linear-stack-4096": 33_603_594,
    "espnet-st": 16_622_312,
    "espnet-st-small": 361_024,
}
# Trained variants: their counts are tested here; exporting them trains them (minutes each), so their
# export runs with the slow tests (`pytest -m slow`).
TRAINED = {
    "gpt2-tiny-trained": 180_480,
    "gpt2-mini-trained": 4_273_664,
    "mlp-sst2-trained": 1_412_354,
    "textclf-agnews-small-trained": 512_260,
    "seq2seq-transformer-small-trained": 797_635,
    "espnet-st-small-trained": 361_024,
    "espnet-st-trained": 16_622_312,
}
# (pruning, form) per model. EmbeddingBag has no torch-pruning handler, so the AG News model has no
# channel group to shrink; the ESPnet encoder/decoder pair is exported by its own exporter, without
# dense-shrunk.
CONFIGURATIONS = {name: ("l1-structured:0.5", "dense-shrunk") for name in PARAMETERS} | {
    "textclf-agnews": ("magnitude:0.5", "dense-shrunk"),
    "espnet-st": ("magnitude:0.5", "csr"),
    "espnet-st-small": ("magnitude:0.5", "csr"),
    "textclf-agnews-small-trained": ("magnitude:0.5", "dense-shrunk"),
    "espnet-st-small-trained": ("magnitude:0.5", "csr"),
    "espnet-st-trained": ("magnitude:0.5", "csr"),
}


def test_the_zoo_is_complete():
    assert {spec.name for spec in list_models()} == set(PARAMETERS) | set(TRAINED)


@pytest.mark.parametrize("name", sorted(PARAMETERS | TRAINED))
def test_model_has_its_cited_parameter_count(name):
    spec = next(s for s in list_models() if s.name == name)
    assert count_parameters(spec.make(trained=False))[0] == (PARAMETERS | TRAINED)[name]
    assert spec.description


@pytest.mark.parametrize("name", sorted(PARAMETERS) + [pytest.param(n, marks=pytest.mark.slow) for n in sorted(TRAINED)])
def test_model_prunes_converts_exports_and_passes_parity(tmp_path, name):
    prune, form = CONFIGURATIONS.get(name, ("l1-structured:0.5", "dense-shrunk"))
    plan = PruningPlan.parse(prune, scope="layer")
    manifest = export_artifact(name, plan, form, tmp_path / name).manifest
    assert manifest.onnx_parity_error <= 1e-4
    assert max(manifest.form_parity_max_abs_error.values(), default=0.0) <= 1e-5
    if plan.method == "l1-structured":
        assert manifest.parameters < manifest.parameters_before_conversion
        assert manifest.flops < manifest.flops_before_conversion
