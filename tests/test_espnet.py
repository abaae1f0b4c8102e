"""ESPnet speech translation on the small preset: build, export, parity, greedy tokens, loading."""

import json
import os
import zipfile

import pytest
import torch
import yaml

pytest.importorskip("espnet2", reason="needs the espnet extra")

from deploykit.core.errors import ArtifactError  # noqa: E402
from deploykit.core.errors import UsageError  # noqa: E402
from deploykit.core.quality import bleu  # noqa: E402
from deploykit.model.espnet import load_st_experiment  # noqa: E402
from deploykit.model.espnet import build_st_model, encode_features
from deploykit.model.zoo.espnet_st import MODULE_GROUPS, PRESETS  # noqa: E402
from deploykit.pipelines.espnet import decode_torch, export_st  # noqa: E402
from deploykit.pipelines.st_decode import decode_onnx  # noqa: E402
from deploykit.prune.base import PruningPlan, load_plan_file, prunable_modules, prune_model, strip_masks  # noqa: E402

CONFIG = yaml.safe_load((PRESETS / "st_small.yaml").read_text())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_st_model(CONFIG)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("st")
    return directory, export_st(model, directory, CONFIG["input_size"])


def test_small_preset_shape(model):
    assert type(model).__name__ == "ESPnetSTModel"
    assert sum(p.numel() for p in model.parameters()) == 361_024
    assert len(model.encoder.encoders) == 2 and len(model.decoder.decoders) == 2
    assert model.vocab_size == 64 and model.sos == model.eos == 63


def test_export_writes_the_pair_and_checks_parity(exported):
    directory, result = exported
    assert sorted(p.name for p in directory.iterdir()) == ["decoder.onnx", "decoder_memory.onnx", "encoder.onnx",
                                                           "st_config.json"]
    assert result.encoder_max_abs_error <= 1e-4 and result.decoder_max_abs_error <= 1e-4
    config = json.loads((directory / "st_config.json").read_text())
    assert config["decoder_layers"] == 2 and config["sos"] == config["eos"] == 63
    assert config["decoder_cache"] == "keys-values" and config["decoder_memory"] == "decoder_memory.onnx"


def test_the_decoder_step_takes_one_token_and_cached_keys_and_values(exported):
    import onnx

    directory, _ = exported
    step = onnx.load(str(directory / "decoder.onnx"))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in step.graph.input}
    assert inputs["token"] == [1, 1] and inputs["position"] == [1]
    # 4 heads of 16 per layer; the self-attention cache grows, the encoder's keys are as long as its output
    assert inputs["self_key_0"] == [1, 4, "cached", 16] and inputs["memory_value_1"] == [1, 4, "encoder_frames", 16]
    assert "memory" not in inputs  # the encoder output is projected once per utterance, in decoder_memory.onnx
    projected = onnx.load(str(directory / "decoder_memory.onnx"))
    assert [o.name for o in projected.graph.output] == ["memory_key_0", "memory_value_0", "memory_key_1",
                                                         "memory_value_1"]


def test_a_decoder_the_cached_form_cannot_express_keeps_espnet_onnxs_and_says_why(model, tmp_path, monkeypatch):
    from deploykit.pipelines import espnet

    monkeypatch.setattr(espnet, "unsupported", lambda decoder: "layer 0 concatenates attention outputs")
    result = export_st(model, tmp_path, CONFIG["input_size"], fuse=False)
    assert result.config["decoder_cache"] == "layer-outputs" and "decoder_memory" not in result.config
    assert result.config["decoder_cache_reason"] == "layer 0 concatenates attention outputs"
    feats = torch.randn(1, 150, 80, generator=torch.Generator().manual_seed(2))
    assert decode_onnx(tmp_path, feats.numpy(), max_tokens=10) == decode_torch(model, feats, max_tokens=10)


def test_unsupported_names_what_the_cached_decoder_cannot_express(model):
    import copy

    from deploykit.pipelines.espnet_decoder import unsupported

    assert unsupported(model.decoder) is None
    decoder = copy.deepcopy(model.decoder)
    decoder.decoders[1].concat_after = True
    assert unsupported(decoder) == "layer 1 concatenates attention outputs or attends to a second memory"
    decoder = copy.deepcopy(model.decoder)
    decoder.embed[1].reverse = True
    assert unsupported(decoder) == "its token embedding is not an Embedding followed by ESPnet's PositionalEncoding"


@pytest.mark.parametrize("change, message", [
    ({"decoder_cache": "ring-buffer"}, "unknown decoder_cache 'ring-buffer'"),
    ({"decoder_memory": "../../outside.onnx"}, "decoder_memory"),
    ({"decoder_memory": None}, "decoder_memory")])
def test_a_damaged_st_config_is_refused_in_one_line(exported, tmp_path, change, message):
    import shutil

    from deploykit.pipelines.st_decode import OnnxSpeechTranslator

    directory, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "st_config.json").read_text())
    (copy / "st_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ArtifactError, match=message):
        OnnxSpeechTranslator(copy)


@pytest.mark.parametrize("frames, beam", [(150, 1), (413, 1), (150, 4), (413, 3)])
def test_onnxruntime_decoding_gives_pytorchs_tokens(model, exported, frames, beam):
    directory, _ = exported
    feats = torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(frames))
    tokens = decode_torch(model, feats, max_tokens=15, beam=beam)
    assert len(tokens) >= 1
    assert decode_onnx(directory, feats.numpy(), max_tokens=15, beam=beam) == tokens


def test_the_benchmarks_greedy_decoding_runs_to_espnets_length_limit(model, exported):
    """The benchmark's greedy output is the decoded tokens padded to ESPnet's default limit, one token
    per encoder frame: the length an untrained model, which never says <eos>, decodes to."""
    from deploykit.pipelines.espnet import TorchTranslator
    from deploykit.pipelines.st_decode import NO_TOKEN, STSession, translate

    directory, _ = exported
    feats = torch.randn(1, 300, 80, generator=torch.Generator().manual_seed(1)).numpy()
    memory, _, tokens = STSession(TorchTranslator(model), None, []).run({"feats": feats})
    assert len(tokens) == memory.shape[1] == 74  # 300 frames, subsampled 4x by two 3x3 convolutions
    decoded = translate(TorchTranslator(model), feats, len(tokens))
    assert list(tokens[:len(decoded)]) == decoded and all(t == NO_TOKEN for t in tokens[len(decoded):])


def test_beam_search_scores_at_least_as_well_as_greedy(model):
    from deploykit.pipelines.espnet import TorchStepper
    from deploykit.pipelines.st_decode import decode

    feats = torch.randn(1, 200, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        memory = encode_features(model, feats)
    stepper = TorchStepper(model, memory)

    def score(tokens):
        total, prefix, state = 0.0, [63], None
        for token in tokens:
            logp, state = stepper.step(prefix, state)
            total += float(logp[token])
            prefix = prefix + [token]
        return total

    greedy = decode(stepper, 63, 63, max_tokens=8, beam=1)
    beam = decode(stepper, 63, 63, max_tokens=8, beam=5)
    assert len(beam) == len(greedy) == 8  # no <eos> within 8 tokens with these random weights
    assert score(beam) >= score(greedy) - 1e-5  # same length: the wider search finds an equal or better sum
    assert beam != greedy  # and here a different, better one


def test_bleu_is_sacrebleus_corpus_bleu_with_its_signature():
    reference = "the cat sat on the mat today"
    assert bleu([reference], [reference]).score == pytest.approx(100.0)
    # 1- to 4-gram precisions 6/7, 4/6, 2/5, 1/4, no brevity penalty: their geometric mean
    expected = 100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    score = bleu(["the cat sat on a mat today"], [reference])
    assert score.score == pytest.approx(expected, abs=1e-9)
    assert score.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    with pytest.raises(UsageError, match="1 hypotheses for 2 references"):
        bleu([reference], [reference, reference])

def _pack(tmp_path, model, name="exp.zip", extra=None):
    root = tmp_path / "exp"
    root.mkdir(exist_ok=True)
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    torch.save(model.state_dict(), root / "valid.acc.ave.pth")
    archive = tmp_path / name
    with zipfile.ZipFile(archive, "w") as zf:
        for path in root.iterdir():
            zf.write(path, f"exp/{path.name}")
        for entry, data in (extra or {}).items():
            zf.writestr(entry, data)
    return root, archive


def _same_encoder(a, b):
    feats = torch.randn(1, 120, 80)
    with torch.no_grad():
        return torch.equal(a.encode(feats, torch.tensor([120]))[0], b.encode(feats, torch.tensor([120]))[0])


def test_real_experiment_loads_from_directory_and_zip(model, tmp_path):
    root, archive = _pack(tmp_path, model)
    from_dir, config = load_st_experiment(root, tmp_path / "w1")
    from_zip, _ = load_st_experiment(archive, tmp_path / "w2")
    assert config["encoder"] == "conformer"
    assert _same_encoder(model, from_dir) and _same_encoder(model, from_zip)


@pytest.mark.parametrize("entry", ["../evil.txt", "exp/../../evil.txt", "/abs/evil.txt"])
def test_zip_entries_escaping_the_target_are_refused(model, tmp_path, entry):
    _, archive = _pack(tmp_path, model, extra={entry: "payload"})
    target = tmp_path / "nested" / "work"
    with pytest.raises(ArtifactError, match="escapes the extraction directory"):
        load_st_experiment(archive, target)
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_zip_symlinks_and_pickle_payloads_are_refused(model, tmp_path):
    _, archive = _pack(tmp_path, model)
    with zipfile.ZipFile(archive, "a") as zf:
        link = zipfile.ZipInfo("exp/link")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(ArtifactError, match="is a symbolic link"):
        load_st_experiment(archive, tmp_path / "w")

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    root = tmp_path / "evil"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    torch.save({"x": Payload()}, root / "model.pth")
    with pytest.raises(ArtifactError, match="cannot load"):
        load_st_experiment(root, tmp_path / "w3")


def test_best_plan_preset_prunes_the_study_groups(tmp_path):
    plan = PruningPlan(**load_plan_file(PRESETS / "best_plan.toml"))
    torch.manual_seed(0)
    model = build_st_model(CONFIG)
    names = [name for name, _ in prunable_modules(model)]
    for pattern in MODULE_GROUPS.values():  # every group addresses real modules
        assert any(__import__("fnmatch").fnmatchcase(n, pattern) for n in names), pattern
    prune_model(model, plan, output_layers=["decoder.output_layer"])
    strip_masks(model)

    def sparsity(module):
        return float((model.get_submodule(module).weight == 0).float().mean())

    assert sparsity("encoder.embed.conv.0") == pytest.approx(0.9, abs=0.01)
    assert sparsity("encoder.encoders.1.conv_module.pointwise_conv1") == pytest.approx(0.7, abs=1e-3)
    assert sparsity("decoder.decoders.0.src_attn.linear_q") == pytest.approx(0.33, abs=1e-3)
    assert sparsity("decoder.decoders.0.feed_forward.w_1") == 0 and sparsity("decoder.output_layer") == 0


def test_cli_exports_the_pair_with_the_preset(cli, tmp_path):
    out = tmp_path / "st"
    result = cli("export", "--model", "espnet-st-small", "--plan", str(PRESETS / "best_plan.toml"),
                 "--form", "csr", "--out", str(out), "--json", "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert set(manifest["files"]) == {"encoder.onnx", "decoder.onnx", "decoder_memory.onnx", "st_config.json",
                                      "weights.safetensors"}
    assert set(manifest["onnx_parity_max_abs_error"]) == {"encoder_out", "decoder_logp"}
    assert max(manifest["onnx_parity_max_abs_error"].values()) <= 1e-4 and manifest["flops"] is None
    # csr stores the 0.9-pruned subsampling convolutions sparse, in the files the parity check ran on
    sparse = manifest["onnx_sparse_initializers"]
    assert sparse and {key.split(":")[0] for key in sparse} <= {"encoder.onnx", "decoder.onnx", "decoder_memory.onnx"}
    assert any(key.startswith("encoder.onnx:encoder.model.embed.conv") for key in sparse)


# -- dense-shrunk, real experiments on the command line, bench ------------------------------------

SHRINK_RULES = ("encoder.encoders.*.feed_forward*=0.5", "encoder.encoders.*.conv_module.*=0.5",
                "decoder.decoders.*.feed_forward.*=0.5", "*=0")


def test_dense_shrunk_removes_feed_forward_and_conv_module_channels(tmp_path):
    from deploykit.export.build import export_artifact
    from deploykit.model.artifact import read_manifest
    from deploykit.prune.base import parse_rule
    from deploykit.runtime.loading import load_torch_model

    plan = PruningPlan("l1-structured", 0.5, rules=tuple(parse_rule(r) for r in SHRINK_RULES))
    result = export_artifact("espnet-st-small", plan, "dense-shrunk", tmp_path / "st")
    m = result.manifest
    assert m.pipeline == "speech-translation" and max(m.onnx_parity_max_abs_error.values()) <= 1e-4
    assert max(m.form_parity_max_abs_error.values()) <= 1e-5
    model, _ = load_torch_model(tmp_path / "st", for_runtime=False)
    for block in model.encoder.encoders:
        conv = block.conv_module
        # GLU halves pointwise_conv1's output: it must keep exactly twice the depthwise channels
        assert conv.pointwise_conv1.out_channels == 2 * conv.depthwise_conv.in_channels < 128
        assert conv.depthwise_conv.groups == conv.depthwise_conv.out_channels == conv.norm.num_features
        assert block.feed_forward.w_1.out_features == block.feed_forward.w_2.in_features < 128
        assert block.self_attn.linear_v.out_features == 64  # heads: never cut channel by channel
    assert m.parameters < m.parameters_before_conversion == 361_024
    assert sum(p.numel() for p in model.parameters()) == m.parameters
    assert read_manifest(tmp_path / "st").shape_changes


def test_dense_shrunk_removes_attention_heads_in_encoder_and_decoder(tmp_path):
    from deploykit.export.build import export_artifact
    from deploykit.prune.base import parse_rule
    from deploykit.runtime.loading import load_torch_model

    rules = ("encoder.encoders.*.self_attn.*=0.5", "decoder.decoders.*.self_attn.*=0.5",
             "decoder.decoders.*.src_attn.*=0.5", "*=0")
    plan = PruningPlan("l1-structured", 0.5, scope="layer", rules=tuple(parse_rule(r) for r in rules))
    result = export_artifact("espnet-st-small", plan, "dense-shrunk", tmp_path / "st")
    m = result.manifest
    assert max(m.onnx_parity_max_abs_error.values()) <= 1e-4 and max(m.form_parity_max_abs_error.values()) <= 1e-5
    model, _ = load_torch_model(tmp_path / "st", for_runtime=False)  # the removal replays from the artifact
    attentions = [b.self_attn for b in model.encoder.encoders] + [
        a for b in model.decoder.decoders for a in (b.self_attn, b.src_attn)]
    for attention in attentions:
        assert attention.h == 2 and attention.d_k == 16  # 4 heads of 16, half of them gone
        assert attention.linear_q.out_features == attention.linear_v.out_features == attention.linear_out.in_features == 32
    for block in model.encoder.encoders:  # rel-pos attention: its position projection and biases go per head too
        assert block.self_attn.linear_pos.out_features == 32 and tuple(block.self_attn.pos_bias_u.shape) == (2, 16)
    assert sum(p.numel() for p in model.parameters()) == m.parameters < m.parameters_before_conversion


def _pack_raw_audio_experiment(tmp_path):
    """An experiment as ESPnet writes it: a raw-audio frontend, global MVN whose statistics file the
    config names by its path in the recipe, the trained weights as valid.acc.ave.pth."""
    import numpy as np

    root = tmp_path / "recipe"
    stats = root / "exp" / "st_stats_raw" / "train" / "feats_stats.npz"
    stats.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    mean = rng.normal(size=20)
    np.savez(stats, count=np.array(100.0), sum=100 * mean, sum_square=100 * (mean ** 2 + rng.uniform(0.5, 2, 20)))
    config = {k: v for k, v in CONFIG.items() if k != "input_size"}
    config.update(frontend="default", frontend_conf={"n_fft": 128, "hop_length": 32, "n_mels": 20, "fs": 8000},
                  normalize="global_mvn", normalize_conf={"stats_file": "exp/st_stats_raw/train/feats_stats.npz"})
    torch.manual_seed(1)
    model = build_st_model({**config, "normalize_conf": {"stats_file": str(stats)}})
    experiment = root / "exp" / "st_train"
    experiment.mkdir()
    (experiment / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save(model.state_dict(), experiment / "valid.acc.ave.pth")
    archive = tmp_path / "st_model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in root.rglob("*"):
            if path.is_file():
                zf.write(path, path.relative_to(root))
    return model, archive


@pytest.mark.parametrize("frames", [150, 413])
def test_pytorch_decoding_with_the_exported_algorithm_gives_espnets_tokens(model, frames):
    """The torch session's cached stages run the modules export traced (keys and values cached): the
    same tokens and log-probabilities as ESPnet's own decoding, so that torch against onnxruntime
    on those stages compares runtimes, not algorithms."""
    from deploykit.pipelines.espnet import TorchCachedTranslator, TorchTranslator
    from deploykit.pipelines.st_decode import state_after, translate

    feats = torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(frames))
    cached, espnet = TorchCachedTranslator(model), TorchTranslator(model)
    assert translate(cached, feats, 15) == translate(espnet, feats, 15)
    prefix = [espnet.sos, 7, 11, 13]
    steps = [t.stepper(t.encode(feats)) for t in (cached, espnet)]
    a, b = (s.step(prefix, state_after(s, prefix[:-1]))[0] for s in steps)
    assert abs(a - b).max() < 1e-4


def test_cli_exports_and_benches_a_real_experiment_zip(cli, tmp_path):
    import numpy as np

    from deploykit.pipelines.st_decode import decode_onnx

    model, archive = _pack_raw_audio_experiment(tmp_path)
    out = tmp_path / "artifact"
    # per layer: a global threshold at 0.5 would empty the conv subsampling's small-weight layer
    result = cli("export", "--model", str(archive), "--prune", "magnitude:0.5", "--scope", "layer", "--form", "csr",
                 "--out", str(out), "--json", "-q")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["model"] == "st_model" and manifest["source"]["kind"] == "espnet-experiment"
    assert {"espnet_config.yaml", "feats_stats.npz"} <= set(manifest["files"])
    config = json.loads((out / "st_config.json").read_text())
    assert config["feats_dim"] == 20 and config["normalization_in_encoder"] is True
    assert config["frontend"]["class"] == "DefaultFrontend"
    # the exported encoder normalises: its output is the PyTorch model's on the same filterbank features
    feats = torch.randn(1, 120, 20, generator=torch.Generator().manual_seed(5))
    from deploykit.pipelines.st_decode import OnnxSpeechTranslator

    with torch.no_grad():
        unnormalised = model.encoder(feats, torch.tensor([120]))[0].numpy()
    encoded = OnnxSpeechTranslator(out).encode(feats.numpy())
    assert np.abs(encoded - unnormalised).max() > 1e-2
    assert decode_onnx(out, feats.numpy(), max_tokens=5)  # it decodes

    bench = cli("bench", str(out), "--min-time", "0", "--min-iters", "2", "--warmup", "0", "--json", "-q")
    assert bench.returncode == 0, bench.stderr
    records = json.loads(bench.stdout)["records"]
    assert {(r["runtime"], r["stage"]) for r in records} == {
        (runtime, stage) for runtime in ("torch", "onnxruntime") for stage in ("encoder", "decoder-step", "greedy")} | {
        ("torch", "decoder-step-cached"), ("torch", "greedy-cached")}  # the export's algorithm under PyTorch
    for r in records:
        assert r["parity_max_abs_error"] <= 1e-4  # greedy tokens included: one differing token would be >= 1
        expected = (["weights.safetensors"] if r["runtime"] == "torch"
                    else ["encoder.onnx", "decoder.onnx", "decoder_memory.onnx"])
        assert r["disk_bytes"] == sum(manifest["files"][name] for name in expected)
    batch = cli("bench", str(out), "--batch", "2", "-q")
    assert batch.returncode == 2 and "one utterance at a time; use batch 1" in batch.stderr


def test_experiment_missing_its_statistics_file_is_refused(tmp_path):
    _, archive = _pack_raw_audio_experiment(tmp_path)
    stripped = tmp_path / "stripped.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith(".npz"):
                dst.writestr(info, src.read(info))
    with pytest.raises(ArtifactError, match="statistics file 'exp/st_stats_raw/train/feats_stats.npz'.*no file"):
        load_st_experiment(stripped, tmp_path / "w")


def _op_count(path, op_type):
    import onnx

    return sum(node.op_type == op_type for node in onnx.load(str(path)).graph.node)


def test_the_encoder_fused_by_onnxruntimes_optimiser_holds_parity_at_every_length(model, exported):
    """The relative-position export lets the conformer fusion turn each self-attention into one
    Attention node and keep PyTorch's output at 1, 3, 5 and 10 s; the artifact keeps whichever graph
    the interleaved timing chose, and says which."""
    from deploykit.pipelines.encoder_fusion import PARITY_FRAMES

    directory, result = exported
    fusion = result.fusion
    assert fusion.fused["Attention"] == len(model.encoder.encoders)
    assert sorted(fusion.errors) == sorted(PARITY_FRAMES) and max(fusion.errors.values()) <= 1e-4
    assert fusion.choice in ("fused", "plain") and fusion.fused_over_plain > 0
    fused_in_file = _op_count(directory / "encoder.onnx", "Attention")
    assert fused_in_file == (len(model.encoder.encoders) if fusion.choice == "fused" else 0)
    config = json.loads((directory / "st_config.json").read_text())
    assert config["encoder_fusion"]["choice"] == fusion.choice
    assert ("kept" if fusion.choice == "fused" else "not kept") in fusion.note()


def test_the_fused_encoder_is_refused_when_it_breaks_parity(model, tmp_path):
    """A fused graph off at any checked length never replaces the plain one (here the reference is
    made wrong, as a fusion that broke some length would look)."""
    import hashlib

    import numpy as np

    from deploykit.pipelines.encoder_fusion import fuse_encoder
    from deploykit.pipelines.espnet import ENCODER_FILE, _encode_numpy

    export_st(model, tmp_path, CONFIG["input_size"], fuse=False)
    path = tmp_path / ENCODER_FILE
    before, files = hashlib.sha256(path.read_bytes()).hexdigest(), sorted(os.listdir(tmp_path))

    def off_at_long_inputs(feats):
        out = _encode_numpy(model, feats)
        return out + 1.0 if feats.shape[1] >= 500 else out

    fusion = fuse_encoder(path, off_at_long_inputs, CONFIG["input_size"], 1e-4)
    assert fusion.choice == "plain" and "at 500 frames" in fusion.reason and sorted(fusion.errors) == [100, 300, 500]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(os.listdir(tmp_path)) == files
    assert np.isfinite(fusion.errors[500])


def test_an_optimiser_that_fails_leaves_the_plain_encoder(model, tmp_path, monkeypatch):
    """The optimiser is a trial: raising on a graph it misreads keeps the plain encoder, says why, and
    writes nothing."""
    import hashlib

    import onnxruntime.transformers.optimizer as optimizer

    from deploykit.pipelines.encoder_fusion import fuse_encoder
    from deploykit.pipelines.espnet import ENCODER_FILE, _encode_numpy

    export_st(model, tmp_path, CONFIG["input_size"], fuse=False)
    path = tmp_path / ENCODER_FILE
    before, files = hashlib.sha256(path.read_bytes()).hexdigest(), sorted(os.listdir(tmp_path))

    def misreads(*args, **kwargs):
        raise AssertionError("unexpected node pattern\nmore detail")

    monkeypatch.setattr(optimizer, "optimize_model", misreads)
    fusion = fuse_encoder(path, lambda feats: _encode_numpy(model, feats), CONFIG["input_size"], 1e-4)
    assert (fusion.choice, fusion.fused, fusion.errors) == ("plain", {}, {})
    assert fusion.reason == "the optimiser fails on this encoder (unexpected node pattern)"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before and sorted(os.listdir(tmp_path)) == files


def test_a_post_norm_decoder_exports_with_cached_keys_and_values(tmp_path):
    """The cached step follows ESPnet's layer in both of its layouts: LayerNorm before each block (the
    presets) and after it (`normalize_before: false`, no final norm)."""
    config = {**CONFIG, "decoder_conf": {**CONFIG["decoder_conf"], "normalize_before": False}}
    torch.manual_seed(1)
    model = build_st_model(config)
    assert not model.decoder.normalize_before
    result = export_st(model, tmp_path, config["input_size"], fuse=False)
    assert result.config["decoder_cache"] == "keys-values" and result.decoder_max_abs_error <= 1e-4
    feats = torch.randn(1, 180, 80, generator=torch.Generator().manual_seed(4))
    assert decode_onnx(tmp_path, feats.numpy(), max_tokens=12) == decode_torch(model, feats, max_tokens=12)
