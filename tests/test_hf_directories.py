"""Local Hugging Face model directories (tiny configs, random weights, `save_pretrained` into a temporary
directory, nothing downloaded) as a model source: the task from the config's architectures, the model
from optimum's AutoModel class for it, the graphs from optimum's exporter, and each family exported
dense, csr, int8 and dense-shrunk with parity; then benchmarked from the artifact alone."""

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("optimum")

from deploykit.bench.runner import bench_artifact  # noqa: E402
from deploykit.bench.settings import Grid, TimingSettings  # noqa: E402
from deploykit.core.errors import UsageError  # noqa: E402
from deploykit.export.build import export_artifact  # noqa: E402
from deploykit.model.sources import ModelOptions, resolve_model  # noqa: E402
from deploykit.prune.base import PruningPlan  # noqa: E402

FAST = TimingSettings(warmup_s=0.01, min_time_s=0.01, min_iters=3)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def _families():
    import transformers as T

    bart = T.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return {
        "bert": T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_labels=3, **SMALL)),
        "distilbert": T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4,
                                                           hidden_dim=64)),
        "vit": T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=5, **SMALL)),
        "t5": T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                      num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)),
        "bart": T.BartForConditionalGeneration(bart),
        # grouped-query attention: 4 query heads share 2 key/value heads
        "llama": T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64,
                                                  **SMALL)),
    }


#: family -> (task, pipeline, graphs)
EXPECTED = {
    "bert": ("text-classification", "optimum-forward", {"model.onnx"}),
    "distilbert": ("feature-extraction", "optimum-forward", {"model.onnx"}),
    "vit": ("image-classification", "optimum-forward", {"model.onnx"}),
    "t5": ("text2text-generation", "text2text-generation", {"encoder.onnx", "decoder.onnx", "decoder_with_past.onnx"}),
    "bart": ("text2text-generation", "text2text-generation", {"encoder.onnx", "decoder.onnx", "decoder_with_past.onnx"}),
    "llama": ("text-generation", "text-generation", {"decoder.onnx", "decoder_with_past.onnx"}),
}


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    for name, model in _families().items():
        model.save_pretrained(root / name)
    return root


#: form -> export arguments (csr per layer: T5 initialises its query projections far smaller than the rest,
#: so one global magnitude threshold would empty them)
FORMS = {
    "dense": dict(plan=PruningPlan("magnitude", 0.5), form="dense"),
    "csr": dict(plan=PruningPlan("magnitude", 0.9, scope="layer"), form="csr"),
    "int8": dict(plan=PruningPlan("magnitude", 0.0), form="dense", quantize="int8"),
    "dense-shrunk": dict(plan=PruningPlan("l1-structured", 0.3), form="dense-shrunk"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_every_family_exports_through_optimum_in_every_form(directories, tmp_path, family, form):
    task, pipeline, graphs = EXPECTED[family]
    options = dict(FORMS[form])
    result = export_artifact(str(directories / family), options.pop("plan"), options.pop("form"), tmp_path / "a",
                             **options)
    m = result.manifest
    assert (m.pipeline, m.source["kind"], m.source["task"]) == (pipeline, "hf-directory", task)
    assert graphs <= {name for name in m.files if name.endswith(".onnx")}
    assert m.onnx_parity_error <= 1e-4  # the export raises beyond tolerance; the record says what was measured
    if form == "csr":
        assert m.nonzero_parameters < 0.5 * m.parameters and m.onnx_sparse_initializers
    if form == "dense-shrunk":  # feed-forward channels go, heads stay whole
        assert m.parameters < m.parameters_before_conversion
    if form == "int8":
        assert set(m.quantization["error"]) == {"onnxruntime", "torch"}
        if pipeline != "optimum-forward":
            assert set(m.quantization["greedy_token_agreement"]) == {"onnxruntime", "torch"}
            # token by token only where the model scores a whole sequence (a causal LM, not an encoder-decoder)
            assert set(m.quantization.get("next_token_agreement", {})) == (
                {"onnxruntime", "torch"} if pipeline == "text-generation" else set())


@pytest.mark.parametrize("family", ["bert", "t5", "llama"])
def test_artifacts_bench_on_every_runtime_from_the_artifact_alone(directories, tmp_path, family):
    # OpenVINO too where its extra is installed: optimum's graphs (with their caches) as they are
    runtimes = ("torch", "onnxruntime") + (("openvino",) if importlib.util.find_spec("openvino") else ())
    export_artifact(str(directories / family), PruningPlan("magnitude", 0.5), "dense", tmp_path / "a")
    records = bench_artifact(tmp_path / "a", Grid(runtimes=runtimes), FAST)
    assert {r.runtime for r in records} == set(runtimes)
    assert all(r.parity_max_abs_error <= 1e-4 for r in records)


def test_inputs_are_optimums_dummy_inputs_seeded_by_deploykit(directories):
    spec = resolve_model(str(directories / "bert"))
    assert spec.input_names == ["input_ids", "attention_mask", "token_type_ids"] and spec.outputs == ("logits",)
    first, again, other = (spec.example_inputs(3, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first, again))
    assert not np.array_equal(first[0].numpy(), other[0].numpy())
    assert [tuple(t.shape) for t in first] == [(3, 16)] * 3 and int(first[0].max()) < 100
    vit = resolve_model(str(directories / "vit"))
    assert vit.inputs[0].shape == ("batch", 3, 32, 32)  # the image size from the config, not a named axis


def test_the_task_can_be_named(directories, tmp_path):
    spec = resolve_model(str(directories / "bert"), ModelOptions(task="feature-extraction"))
    assert spec.outputs == ("last_hidden_state",) and spec.pipeline == "optimum-forward"
    with pytest.raises(UsageError, match="--task text2text-generation is not one deploykit can export for 'bert'; "
                                         "choose from feature-extraction"):
        resolve_model(str(directories / "bert"), ModelOptions(task="text2text-generation"))
    with pytest.raises(UsageError, match="an encoder-decoder model runs as text2text-generation"):
        resolve_model(str(directories / "t5"), ModelOptions(task="feature-extraction"))
    with pytest.raises(UsageError, match="--task applies to a Hugging Face model directory; 'mlp-sst2' is not one"):
        resolve_model("mlp-sst2", ModelOptions(task="text-generation"))


def _config_dir(tmp_path, values):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(values))
    return str(tmp_path / "m")


@pytest.mark.parametrize("values, message", [
    ({"model_type": "bert"}, "cannot tell the task from architectures None; give --task"),
    ({"model_type": "no-such-model"}, "transformers cannot read model_type 'no-such-model'"),
    ({"model_type": "bert", "auto_map": {"AutoModel": "evil.Model"}}, "names custom code (auto_map), which deploykit "
                                                                      "does not run"),
    ({"architectures": ["BertModel"]}, "config.json has no model_type"),
])
def test_directories_deploykit_cannot_read_are_refused_in_one_line(tmp_path, cli, values, message):
    result = cli("export", "--model", _config_dir(tmp_path, values), "--out", str(tmp_path / "a"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not (tmp_path / "a").exists()


def test_heads_are_pruned_as_units_by_their_rows_and_the_config_says_so(tmp_path):
    """One head per layer made weak (its query/key/value rows scaled down): per-layer L1 at 0.25 removes
    exactly it, through the model's own prune_heads; the artifact's config builds the shipped shapes."""
    import torch
    import transformers as T
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_labels=3, **SMALL))
    weak = {0: 2, 1: 1}  # layer -> head
    with torch.no_grad():
        for layer, head in weak.items():
            attention = model.bert.encoder.layer[layer].attention.self
            for projection in (attention.query, attention.key, attention.value):
                projection.weight[head * 8:(head + 1) * 8] *= 0.01
    model.save_pretrained(tmp_path / "bert")
    # the feed-forward and the pooler stay (rules 0), so that only heads go
    plan = PruningPlan("l1-structured", 0.25, scope="layer",
                       rules=(("*.intermediate.dense", 0.0), ("*.pooler.dense", 0.0)))
    result = export_artifact(str(tmp_path / "bert"), plan, "dense-shrunk", tmp_path / "a")
    assert result.manifest.onnx_parity_error <= 1e-4
    config = json.loads((tmp_path / "a" / "hf_config.json").read_text())
    assert {int(k): v for k, v in config["pruned_heads"].items()} == {layer: [head] for layer, head in weak.items()}
    rebuilt = T.BertForSequenceClassification(T.BertConfig.from_dict(config))  # transformers alone, no deploykit
    shipped = {k.removeprefix("model."): v for k, v in load_file(tmp_path / "a" / "weights.safetensors").items()}
    rebuilt.load_state_dict(shipped, strict=True)
    assert rebuilt.bert.encoder.layer[0].attention.self.query.out_features == 3 * 8


@pytest.mark.parametrize("amount, heads_left", [(0.25, 4), (0.5, 2)])
def test_round_to_counts_a_head_as_its_width(directories, tmp_path, amount, heads_left):
    """Heads of 8 channels with --round-to 16: they go in pairs (3 heads = 24 channels is not aligned, so
    the layer keeps 4); feed-forward widths are multiples of 16."""
    plan = PruningPlan("l1-structured", amount, scope="layer", round_to=16)
    changes = export_artifact(str(directories / "bert"), plan, "dense-shrunk", tmp_path / "a").manifest.shape_changes
    width = {name: int(after.rpartition("-> ")[2].rstrip(")")) for name, (_, after) in changes.items()}
    queries = [w for name, w in width.items() if name.endswith(".query")]
    assert queries == ([] if heads_left == 4 else [heads_left * 8] * 2)
    assert all(w % 16 == 0 for name, w in width.items() if name.endswith("intermediate.dense"))


def test_a_directory_with_heads_pruned_before_rebuilds_from_its_artifact(tmp_path):
    import torch
    import transformers as T

    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_labels=3, **SMALL))
    model.prune_heads({0: [3]})  # saved in its config.json as {"0": [3]}
    model.save_pretrained(tmp_path / "bert")
    plan = PruningPlan("l1-structured", 0.5, scope="layer")
    export_artifact(str(tmp_path / "bert"), plan, "dense-shrunk", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "hf_config.json").read_text())
    assert 3 in config["pruned_heads"]["0"] and len(config["pruned_heads"]["0"]) == 3  # 1 before, 2 of 3 left now
    records = bench_artifact(tmp_path / "a", Grid(runtimes=("torch",)), FAST)  # rebuilt: before, then replayed
    assert all(r.parity_max_abs_error <= 1e-4 for r in records)


def test_bart_encoder_heads_go_and_its_decoder_heads_stay(directories, tmp_path):
    """BART's attention infers its head count from the projection width: encoder heads are sliced out
    (its decoder's heads size optimum's cache inputs, alike in every layer: they stay)."""
    plan = PruningPlan("l1-structured", 0.5, scope="layer")
    result = export_artifact(str(directories / "bart"), plan, "dense-shrunk", tmp_path / "a")
    changes = result.manifest.shape_changes
    assert {name for name in changes if ".self_attn." in name} == {
        f"model.model.encoder.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj",
                                                                                  "out_proj")}
    assert changes["model.model.encoder.layers.0.self_attn.q_proj"][1] == "Linear(32 -> 16)"  # 2 of 4 heads of 8
    records = bench_artifact(tmp_path / "a", Grid(runtimes=("torch", "onnxruntime")), FAST)
    assert all(r.parity_max_abs_error <= 1e-4 for r in records)  # greedy tokens included


def _others():
    import transformers as T

    return {
        # positions from the attention mask, and only 48 of them: prompt + 64 benchmark tokens do not fit
        "opt": T.OPTForCausalLM(T.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=48)),
        # no decoder_start_token_id in its config (mBART leaves it to generation settings)
        "mbart": T.MBartForConditionalGeneration(T.MBartConfig(
            vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)),
        # its class is one of a tuple in optimum's task table
        "deit": T.DeiTForImageClassification(T.DeiTConfig(image_size=32, patch_size=8, num_labels=4, **SMALL)),
    }


@pytest.mark.parametrize("family", ["opt", "mbart", "deit"])
def test_more_architectures_export_and_quantize(tmp_path, family):
    import torch

    torch.manual_seed(0)
    _others()[family].save_pretrained(tmp_path / family)
    result = export_artifact(str(tmp_path / family), PruningPlan(), "dense", tmp_path / "a", quantize="int8")
    assert result.manifest.onnx_parity_error <= 1e-4
    records = bench_artifact(tmp_path / "a", Grid(runtimes=("onnxruntime",)), FAST)
    assert records and all(r.parity_max_abs_error is not None for r in records)


def test_grouped_query_heads_go_alike_in_every_layer_and_the_config_says_how_many(tmp_path):
    """Llama's key/value heads (each with the query heads that share it) go as units, the same number in
    every layer although the plan asks more of one layer: the cache inputs of every layer are sized by
    the config's counts, which the artifact's config then carries; transformers alone rebuilds it."""
    import torch
    import transformers as T
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, num_key_value_heads=4, max_position_embeddings=64, hidden_size=64,
                           num_hidden_layers=2, num_attention_heads=8, intermediate_size=64)
    T.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    plan = PruningPlan("l1-structured", 0.25, scope="layer",
                       rules=(("*.layers.1.self_attn.q_proj", 0.5), ("*.mlp.*", 0.0)))
    result = export_artifact(str(tmp_path / "llama"), plan, "dense-shrunk", tmp_path / "a")
    assert result.manifest.onnx_parity_error <= 1e-4
    changes = result.manifest.shape_changes
    for layer in range(2):  # 1 of 4 key/value heads, with its 2 query heads of 8, in both layers
        attention = f"model.model.layers.{layer}.self_attn"
        assert changes[f"{attention}.k_proj"] == ["Linear(64 -> 32)", "Linear(64 -> 24)"]
        assert changes[f"{attention}.q_proj"] == ["Linear(64 -> 64)", "Linear(64 -> 48)"]
    written = json.loads((tmp_path / "a" / "hf_config.json").read_text())
    assert (written["num_attention_heads"], written["num_key_value_heads"], written["head_dim"]) == (6, 3, 8)
    rebuilt = T.LlamaForCausalLM(T.LlamaConfig.from_dict(written))
    shipped = {k.removeprefix("model."): v for k, v in load_file(tmp_path / "a" / "weights.safetensors").items()}
    rebuilt.load_state_dict(shipped, strict=False)  # the tied/rotary buffers aside, every shape fits
    records = bench_artifact(tmp_path / "a", Grid(runtimes=("torch", "onnxruntime")), FAST)
    assert all(r.parity_max_abs_error <= 1e-4 for r in records)  # cached decode steps and greedy tokens


def test_grouped_query_heads_stay_everywhere_when_one_layer_keeps_its_own(tmp_path):
    import torch
    import transformers as T

    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64,
                                     **SMALL)).save_pretrained(tmp_path / "llama")
    plan = PruningPlan("l1-structured", 0.5, scope="layer", exclude=("*.layers.0.self_attn",))
    changes = export_artifact(str(tmp_path / "llama"), plan, "dense-shrunk", tmp_path / "a").manifest.shape_changes
    assert not any(".self_attn." in name for name in changes) and any(".mlp." in name for name in changes)


def test_t5_encoder_heads_go_through_its_own_prune_heads_and_its_decoder_heads_stay(directories, tmp_path):
    """T5's encoder layers prune their own heads (the shared relative-position bias keeps the original
    count; each layer picks its heads' columns): per layer, unevenly is fine, and the artifact rebuilds
    them. Its decoder's heads size the cache: asked for those alone, the refusal says so."""
    plan = PruningPlan("l1-structured", 0.5, scope="layer",
                       rules=(("*.encoder.block.1.layer.0.SelfAttention.q", 0.25),
                              ("*.encoder.block.*.SelfAttention.q", 0.5), ("*", 0.0)))
    result = export_artifact(str(directories / "t5"), plan, "dense-shrunk", tmp_path / "a")
    changes = result.manifest.shape_changes
    assert changes["model.encoder.block.0.layer.0.SelfAttention.q"] == ["Linear(32 -> 32)", "Linear(32 -> 16)"]
    assert changes["model.encoder.block.1.layer.0.SelfAttention.q"] == ["Linear(32 -> 32)", "Linear(32 -> 24)"]
    assert not any(".decoder." in name for name in changes)
    # transformers cannot prune T5's heads as it builds the model (`_prune_heads` is missing where it looks), so
    # a config saying pruned_heads would no longer load: it says none, and the artifact's history rebuilds them
    config = json.loads((tmp_path / "a" / "hf_config.json").read_text())
    assert not config.get("pruned_heads")
    records = bench_artifact(tmp_path / "a", Grid(runtimes=("torch", "onnxruntime")), FAST)
    assert all(r.parity_max_abs_error <= 1e-4 for r in records)
    decoder_only = PruningPlan("l1-structured", 0.5, rules=(("*.decoder.*.SelfAttention.q", 0.5), ("*", 0.0)))
    with pytest.raises(UsageError, match=r"not removable: .*SelfAttention\.q \(a projection of an attention module "
                                         r"whose heads stay: a decoder's heads size its key/value cache"):
        export_artifact(str(directories / "t5"), decoder_only, "dense-shrunk", tmp_path / "b")
    assert not (tmp_path / "b").exists()
