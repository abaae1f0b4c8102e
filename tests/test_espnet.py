"""ESPnet speech translation on the small preset: build, export, parity, greedy tokens, loading."""

import json
import os
import zipfile

import pytest
import torch
import yaml

pytest.importorskip("espnet2", reason="needs the espnet extra")

from deploykit.errors import ArtifactError  # noqa: E402
from deploykit.espnet import bleu, build_st_model, decode_onnx, decode_torch, export_st, load_st_experiment  # noqa: E402
from deploykit.prune import PruningPlan, load_plan_file, prunable_modules, prune_model, strip_masks  # noqa: E402
from deploykit.zoo.espnet_st import MODULE_GROUPS, PRESETS  # noqa: E402

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
    assert sorted(p.name for p in directory.iterdir()) == ["decoder.onnx", "encoder.onnx", "st_config.json"]
    assert result.encoder_max_abs_error <= 1e-4 and result.decoder_max_abs_error <= 1e-4
    config = json.loads((directory / "st_config.json").read_text())
    assert config["decoder_layers"] == 2 and config["sos"] == config["eos"] == 63


@pytest.mark.parametrize("frames, beam", [(150, 1), (413, 1), (150, 4), (413, 3)])
def test_onnxruntime_decoding_gives_pytorchs_tokens(model, exported, frames, beam):
    directory, _ = exported
    feats = torch.randn(1, frames, 80, generator=torch.Generator().manual_seed(frames))
    tokens = decode_torch(model, feats, max_tokens=15, beam=beam)
    assert len(tokens) >= 1
    assert decode_onnx(directory, feats.numpy(), max_tokens=15, beam=beam) == tokens


def test_beam_search_scores_at_least_as_well_as_greedy(model):
    from deploykit.espnet import TorchStepper, decode

    feats = torch.randn(1, 200, 80, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        memory = model.encode(feats, torch.tensor([200]))[0]
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


def test_bleu_is_4_gram_corpus_bleu():
    reference = "the cat sat on the mat today".split()
    assert bleu([reference], [reference]) == pytest.approx(100.0)
    assert 0 < bleu(["the cat sat on a mat today".split()], [reference]) < 100
    with pytest.raises(Exception, match="1 hypotheses for 2 references"):
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
    assert set(manifest["files"]) == {"encoder.onnx", "decoder.onnx", "st_config.json", "weights.safetensors"}
    assert set(manifest["onnx_parity_max_abs_error"]) == {"encoder_out", "decoder_logp"}
    assert max(manifest["onnx_parity_max_abs_error"].values()) <= 1e-4 and manifest["flops"] is None
    # csr stores the 0.9-pruned subsampling convolutions sparse, in the files the parity check ran on
    sparse = manifest["onnx_sparse_initializers"]
    assert sparse and {key.split(":")[0] for key in sparse} <= {"encoder.onnx", "decoder.onnx"}
    assert any(key.startswith("encoder.onnx:model.embed.conv") for key in sparse)
    bad = cli("export", "--model", "espnet-st-small", "--form", "dense-shrunk", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "supports forms dense, csr, not 'dense-shrunk'" in bad.stderr
