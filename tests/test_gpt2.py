"""GPT-2 through optimum: export with and without the cache, greedy tokens identical to transformers',
structured pruning of heads and MLP blocks, local model directories, perplexity, and the benchmark."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("optimum")

from deploykit.bench.runner import bench_artifact  # noqa: E402
from deploykit.bench.settings import Grid, TimingSettings  # noqa: E402
from deploykit.convert.quantize import token_agreement  # noqa: E402
from deploykit.core.errors import UsageError  # noqa: E402
from deploykit.export.build import export_artifact  # noqa: E402
from deploykit.model.causal_lm import greedy, next_token_agreement, perplexity  # noqa: E402
from deploykit.pipelines.textgen import OnnxCausalLM  # noqa: E402
from deploykit.prune.base import PruningPlan  # noqa: E402
from deploykit.runtime.loading import load_torch_model  # noqa: E402

FAST = TimingSettings(warmup_s=0.01, min_time_s=0.01, min_iters=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_artifact("gpt2-tiny", PruningPlan("magnitude", 0.5), "csr", tmp_path_factory.mktemp("g") / "a")


def test_export_writes_both_graphs_and_checks_them(tiny):
    m = tiny.manifest
    assert m.pipeline == "text-generation"
    assert {"decoder.onnx", "decoder_with_past.onnx", "textgen_config.json"} <= set(m.files)
    assert set(m.onnx_parity_max_abs_error) == {"prompt_logits", "step_logits", "logits"}
    assert m.onnx_parity_error <= 1e-4
    ort = OnnxCausalLM(tiny.directory)
    assert len(ort.past_names) == 4  # key and value of 2 layers
    assert {i.name for i in ort.no_past.get_inputs()}.isdisjoint(ort.past_names)
    assert m.metrics["perplexity"] > 1


def _external_bytes(directory, names):
    """Bytes the graphs' initializers refer to in external data, and the data files they name."""
    import onnx

    referenced, files = 0, set()
    for name in names:
        for tensor in onnx.load(str(directory / name), load_external_data=False).graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entries = {e.key: e.value for e in tensor.external_data}
                referenced += int(entries["length"])
                files.add(entries["location"])
    return referenced, files


def _largest_inline_bytes(directory, names):
    import onnx
    from onnx import numpy_helper

    return max(numpy_helper.to_array(t).nbytes for name in names
               for t in onnx.load(str(directory / name), load_external_data=False).graph.initializer
               if t.data_location != onnx.TensorProto.EXTERNAL)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_both_decoder_graphs_share_one_copy_of_the_weights(tmp_path, quantize):
    """optimum writes every weight into both graphs; the artifact keeps one copy they both point into."""
    result = export_artifact("gpt2-tiny", PruningPlan("magnitude", 0.5), "dense", tmp_path / "a", quantize=quantize)
    m = result.manifest
    graphs = ("decoder.onnx", "decoder_with_past.onnx")
    referenced, files = _external_bytes(result.directory, graphs)
    assert files == {"graphs.weights"} and m.files["graphs.weights"] < 0.55 * referenced  # each weight once
    assert _largest_inline_bytes(result.directory, graphs) < 1024  # every larger tensor is in the shared file
    assert m.onnx_parity_error <= 1e-4
    records = bench_artifact(result.directory, Grid(runtimes=("onnxruntime",)), FAST)
    assert records and all(r.disk_bytes >= m.files["graphs.weights"] for r in records)


def test_onnxruntime_greedy_tokens_are_transformers_generate_tokens(tiny):
    model, _ = load_torch_model(tiny.directory, for_runtime=False)
    hf = model.model
    prompt = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                               use_cache=True, pad_token_id=hf.config.eos_token_id)[0, 12:].tolist()
    got = greedy(OnnxCausalLM(tiny.directory), prompt[0].tolist(), 40, hf.config.eos_token_id)
    assert got == expected and len(got) == 40


def test_heads_and_mlp_blocks_shrink_and_export(tmp_path):
    result = export_artifact("gpt2-tiny", PruningPlan("l2-structured", 0.5, scope="layer"), "dense-shrunk",
                             tmp_path / "a")
    m = result.manifest
    assert m.shape_changes["model.transformer.h.0.attn.c_attn"] == ["Conv1D(64 -> 192)", "Conv1D(64 -> 96)"]
    assert m.shape_changes["model.transformer.h.0.mlp.c_fc"] == ["Conv1D(64 -> 256)", "Conv1D(64 -> 128)"]
    assert m.parameters < m.parameters_before_conversion and m.flops < m.flops_before_conversion
    ort = OnnxCausalLM(result.directory)
    assert [i.shape[1] for i in ort.with_past.get_inputs() if i.name.startswith("past_key_values.")] == [2] * 4
    assert m.onnx_parity_error <= 1e-4


def test_heads_stay_even_across_layers_and_say_why(tmp_path):
    # one config head count sizes every layer's cache: a rule keeping layer 0's heads keeps every layer's
    m = export_artifact("gpt2-tiny", PruningPlan("l2-structured", 0.5, rules=(("*.h.0.attn.c_attn", 0.0),)),
                        "dense-shrunk", tmp_path / "a").manifest
    assert not any(".attn." in name for name in m.shape_changes)
    assert m.unpruned_weights["model.transformer.h.0.attn.c_attn.weight"] == "the plan gives it sparsity 0 (a rule)"
    assert m.unpruned_weights["model.transformer.h.1.attn.c_attn.weight"].startswith(
        "model.transformer.h.1.attn kept its 4 heads: under the global plan")
    assert "the layer that lost fewest sets the count" in m.unpruned_weights["model.transformer.h.1.attn.c_attn.weight"]


def test_a_global_head_plan_evens_gpt2s_heads(tmp_path):
    m = export_artifact("gpt2-tiny", PruningPlan("l1-structured", 0.5), "dense-shrunk", tmp_path / "a").manifest
    widths = {m.shape_changes[f"model.transformer.h.{i}.attn.c_attn"][1] for i in (0, 1)}
    assert len(widths) == 1 and widths != {"Conv1D(64 -> 192)"}  # the same heads left in each layer, fewer
    assert max(m.onnx_parity_max_abs_error.values()) <= 1e-4


def test_local_model_directory_exports_and_benches(tmp_path, cli):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, n_positions=128)).save_pretrained(
        tmp_path / "my-gpt2")
    out = tmp_path / "artifact"
    result = cli("export", "--model", str(tmp_path / "my-gpt2"), "--prune", "magnitude:0.3", "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "my-gpt2" and manifest["source"]["kind"] == "hf-directory"
    records = bench_artifact(out, Grid(runtimes=("torch", "onnxruntime")), FAST)
    assert [(r.runtime, r.stage) for r in records] == [(rt, stage) for rt in ("torch", "onnxruntime")
                                                       for stage in ("prompt", "decode-step", "generate")]
    assert all(r.parity_max_abs_error <= 1e-4 for r in records)  # greedy token ids included: any difference fails


def test_bench_refuses_batches_of_prompts(tiny):
    with pytest.raises(UsageError, match="text generation decodes one prompt at a time; use batch 1"):
        bench_artifact(tiny.directory, Grid(runtimes=("onnxruntime",), batches=(2,)), FAST)


class Uniform:
    """A language model that gives every token the same probability."""

    def __init__(self, vocab):
        self.vocab = vocab

    def logits(self, ids):
        return np.zeros((1, ids.shape[1], self.vocab))


def test_perplexity_of_a_uniform_model_is_its_vocabulary_size():
    assert perplexity(Uniform(50), [3, 1, 4, 1, 5, 9, 2, 6]) == pytest.approx(50)


class Counting:
    """A language model whose next token is the last one plus one (mod its vocabulary), but after `odd`
    it is `odd` + 2: a model that differs from a counter at one prefix."""

    def __init__(self, vocab, odd=None):
        self.vocab, self.odd = vocab, odd

    def _next(self, last):
        return (last + (2 if last == self.odd else 1)) % self.vocab

    def logits(self, ids):
        out = np.zeros((1, ids.shape[1], self.vocab))
        out[0, np.arange(ids.shape[1]), [self._next(int(t)) for t in ids[0]]] = 1.0
        return out

    def prefill(self, prompt):
        return self.logits(prompt)[0, -1], None

    def step(self, token, state):
        return self.logits(np.array([[token]]))[0, -1], None


def test_next_token_agreement_costs_one_token_per_differing_choice_where_free_running_loses_the_rest():
    counter, odd = Counting(50), Counting(50, odd=12)
    prompt = [7, 8, 9]
    tokens = greedy(counter, prompt, 20)  # 10, 11, ..., 29
    assert tokens == list(range(10, 30))
    # free-running, the odd model jumps at 12 and stays off by one: 3 of 20 tokens agree
    assert token_agreement(np.array(tokens), np.array(greedy(odd, prompt, 20))) == pytest.approx(3 / 20)
    # given the counter's own prefix each time, it differs at the one position after 12
    assert next_token_agreement(odd, prompt, tokens) == pytest.approx(19 / 20)
    assert next_token_agreement(counter, prompt, tokens) == 1.0
    assert next_token_agreement(odd, prompt, []) == 1.0


def test_perplexity_agrees_across_runtimes(tiny):
    from deploykit.model.hf import TorchCausalLM

    model, _ = load_torch_model(tiny.directory, for_runtime=False)
    tokens = list(range(100, 160))
    assert perplexity(OnnxCausalLM(tiny.directory), tokens) == pytest.approx(perplexity(TorchCausalLM(model), tokens),
                                                                          rel=1e-5)
