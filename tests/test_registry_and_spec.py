import pytest

from deploykit.core.errors import UnknownNameError
from deploykit.core.registry import Registry
from deploykit.model.catalog import list_models
from deploykit.model.spec import InputSpec


def test_unknown_name_lists_known_names():
    registry = Registry("widget")
    registry.add("b", 2)
    registry.add("a", 1)
    with pytest.raises(UnknownNameError) as info:
        registry.get("c")
    assert str(info.value) == "unknown widget 'c'; known: a, b"


def test_duplicate_registration_is_refused():
    registry = Registry("widget")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", 2)


def test_mlp_sst2_has_the_studys_shape(mlp):
    assert sum(p.numel() for p in mlp.parameters()) == 1_412_354
    assert sum(p.numel() * p.element_size() for p in mlp.parameters()) == 5_649_416  # 5.65 MB float32
    shapes = {name: tuple(p.shape) for name, p in mlp.named_parameters()}
    assert shapes["mlp.0.weight"] == (256, 5000)
    assert shapes["mlp.6.weight"] == (2, 256)


def test_model_build_is_seeded(mlp_spec):
    a, b = mlp_spec.make(), mlp_spec.make()
    assert all((pa == pb).all() for pa, pb in zip(a.parameters(), b.parameters()))


def test_example_inputs_follow_the_input_spec(mlp_spec):
    (bow,) = mlp_spec.example_inputs(4, seed=3)
    assert bow.shape == (4, 5000) and bow.dtype.is_floating_point
    assert set(bow.unique().tolist()) <= {0.0, 1.0}  # bag of words: word present or not
    (again,) = mlp_spec.example_inputs(4, seed=3)
    assert (bow == again).all()
    assert mlp_spec.dynamic_axes() == {"bow": {0: "batch"}, "logits": {0: "batch"}}


def test_input_spec_validation():
    with pytest.raises(ValueError, match="needs `high`"):
        InputSpec("ids", ("batch", 8), "int64")
    with pytest.raises(ValueError, match="no size given for dynamic axis 'seq'"):
        InputSpec("x", ("batch", "seq")).concrete_shape(2)


def test_zoo_lists_mlp_sst2():
    assert "mlp-sst2" in [spec.name for spec in list_models()]


def test_declared_names_are_listed_and_loaded_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "plugin_for_registry_test.py").write_text(
        "from tests_registry_target import REG\nREG.add('late', 42)\n")
    (tmp_path / "tests_registry_target.py").write_text(
        "from deploykit.core.registry import Registry\nREG = Registry('widget')\nREG.declare('late', 'plugin_for_registry_test')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from tests_registry_target import REG

    assert REG.names() == ["late"] and "late" in REG
    assert REG.get("late") == 42
