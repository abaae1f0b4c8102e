"""Hugging Face models brought as entry points (tiny configs, random weights, nothing downloaded):
every family exports with parity in csr, and dense-shrunk removes feed-forward channels, and attention
heads only as whole heads (where the module prunes its own heads), never single projection channels."""

import json
import textwrap

import pytest

pytest.importorskip("transformers")

FAMILIES = textwrap.dedent('''
    import torch
    from transformers import (BartConfig, BartModel, BertConfig, BertModel, DistilBertConfig, DistilBertModel,
                              T5Config, T5EncoderModel, ViTConfig, ViTModel)

    def _ids():
        return (torch.randint(0, 100, (2, 8)),)

    def bert():
        return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=64)).eval(), _ids()

    def distilbert():
        return DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                max_position_embeddings=64)).eval(), _ids()

    def bart_encoder():
        config = BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_position_embeddings=64)
        return BartModel(config).get_encoder().eval(), _ids()

    def t5_encoder():
        config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return T5EncoderModel(config).eval(), _ids()

    def vit():
        config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64)
        return ViTModel(config).eval(), (torch.randn(2, 3, 16, 16),)
''')

#: feed-forward layers (their output channels) per family, 2 layers of 64 each before pruning
FFN = {"bert": "encoder.layer.{}.intermediate.dense", "distilbert": "transformer.layer.{}.ffn.lin1",
       "bart_encoder": "layers.{}.fc1", "t5_encoder": "encoder.block.{}.layer.1.DenseReluDense.wi",
       "vit": "encoder.layer.{}.intermediate.dense"}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "families.py"
    path.write_text(FAMILIES)
    return path


@pytest.mark.parametrize("family", sorted(FFN))
def test_hugging_face_encoders_shrink_their_feed_forward_and_keep_heads(cli, families, tmp_path, family):
    r = cli("export", "--model", f"{families}:{family}", "--prune", "l1-structured:0.3", "--form", "dense-shrunk",
            "--out", str(tmp_path / "s"), "--json", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert max(m["onnx_parity_max_abs_error"].values()) <= m["parity_tolerance"]
    changed = m["shape_changes"]
    for layer in range(2):
        before, after = changed[FFN[family].format(layer)]
        assert before.endswith("-> 64)") and not after.endswith("-> 64)"), (before, after)
    projections = ("query", "key", "value", "q_lin", "k_lin", "v_lin", "q_proj", "k_proj", "v_proj")
    for name, (_, after) in changed.items():  # BERT, DistilBERT, ViT, BART encoder heads go whole
        if name.rpartition(".")[2] in projections:
            assert int(after.rpartition("-> ")[2].rstrip(")")) % 8 == 0, (name, after)
    # T5's heads share one relative-position bias: they stay whole
    assert not any(".SelfAttention." in name for name in changed)
    assert m["parameters"] < m["parameters_before_conversion"]


@pytest.mark.parametrize("family", ["bert", "t5_encoder"])
def test_hugging_face_encoders_export_csr_with_parity(cli, families, tmp_path, family):
    r = cli("export", "--model", f"{families}:{family}", "--prune", "magnitude:0.5", "--form", "csr",
            "--out", str(tmp_path / "c"), "--json", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["outputs"][0] == "last_hidden_state"
    assert max(m["onnx_parity_max_abs_error"].values()) <= m["parity_tolerance"]
