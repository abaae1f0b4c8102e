import json
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from deploykit.core.errors import ArtifactError
from deploykit.core.storage import encode_smallest, index_dtype, load_weights, save_weights
from deploykit.prune.base import PruningPlan, prune_model, strip_masks

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]


def _sparse_tensor(shape, sparsity, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator) * 10
    values[torch.rand(shape, generator=generator) < sparsity] = 0
    return values.to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    sparsity=st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99, 1.0]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    codec=st.sampled_from(["zlib", "lzma"]),
)
def test_round_trip_is_exact_and_never_larger_than_dense(tmp_path_factory, shape, sparsity, dtype, seed, codec):
    tmp = tmp_path_factory.mktemp("w")
    state = {"layer.weight": _sparse_tensor(shape, sparsity, dtype, seed), "layer.bias": torch.ones(3, dtype=dtype)}
    save_weights(state, tmp / "dense.safetensors", "dense")
    save_weights(state, tmp / "compact.safetensors", "compact")
    save_weights(state, tmp / "compressed.safetensors", "compact", compression=codec)
    assert (tmp / "compressed.safetensors").stat().st_size <= (tmp / "compact.safetensors").stat().st_size
    for name in ("dense", "compact", "compressed"):
        loaded = load_weights(tmp / f"{name}.safetensors")
        assert set(loaded) == set(state)
        for key, tensor in state.items():
            assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape
            assert torch.equal(loaded[key], tensor)
    assert (tmp / "compact.safetensors").stat().st_size <= (tmp / "dense.safetensors").stat().st_size


def test_encoding_choice_follows_byte_counts():
    dense = torch.randn(64, 64)
    assert encode_smallest("w", dense).kind == "dense"
    half = dense * (torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.5)
    assert encode_smallest("w", half).kind == "bitmask"  # 1 bit/element beats 1 byte/nonzero of CSR
    columns = dense.clone()
    columns[:, ::2] = 0  # whole zero columns: blocks of rows in a column cost a bit per block
    assert encode_smallest("w", columns).kind == "blocks"
    very = torch.zeros(512, 512)
    very[::50, ::50] = 1.0
    encoded = encode_smallest("w", very)
    assert encoded.kind == "csr"
    assert encoded.parts["col"].dtype == torch.uint16  # 512 columns need more than uint8
    assert encoded.parts["crow"].dtype == torch.uint8  # 121 nonzeros fit in uint8


def test_block_pruned_weights_store_kept_blocks_and_a_bit_per_block(tmp_path):
    g = torch.Generator().manual_seed(0)
    for block in ((8, 8), (1, 4), (16, 16)):
        kept = torch.rand(256 // block[0], 128 // block[1], generator=g) >= 0.9
        weight = torch.randn(256, 128, generator=g) * kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        encoded = encode_smallest("w", weight)
        assert (encoded.kind, encoded.block) == ("blocks", block)
        blocks = kept.numel()
        assert encoded.payload_bytes == int(kept.sum()) * block[0] * block[1] * 4 + (blocks + 7) // 8
        save_weights({"w": weight}, tmp_path / "w.safetensors", "compact")
        assert torch.equal(load_weights(tmp_path / "w.safetensors")["w"], weight)


def _tampered_blocks(tmp_path, edit) -> str:
    weight = torch.zeros(40, 40)  # 25 blocks of 8x8: 4 mask bytes, 7 padding bits
    weight[:8, :8] = 1.0
    save_weights({"w": weight}, tmp_path / "w.safetensors", "compact")
    tensors, metadata = {}, {}
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    records = json.loads(metadata["encodings"])
    assert records["w"]["kind"] == "blocks"
    edit(records["w"], tensors)
    metadata["encodings"] = json.dumps(records)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ArtifactError) as error:
        load_weights(tmp_path / "bad.safetensors")
    return str(error.value)


@pytest.mark.parametrize("edit, message", [
    (lambda record, _t: record.update(block=[3, 8]), "does not divide"),
    (lambda record, _t: record.update(block=[0, 8]), "bad block"),
    (lambda record, _t: record.update(block="8x8"), "bad block"),
    (lambda _r, tensors: tensors.update({"w::values": tensors["w::values"][:10].clone()}), "values stored"),
    (lambda _r, tensors: tensors.update({"w::mask": torch.full((4,), 255, dtype=torch.uint8)}), "padding bits"),
])
def test_a_tampered_block_encoding_is_refused(tmp_path, edit, message):
    assert message in _tampered_blocks(tmp_path, edit)


@pytest.mark.parametrize("value, dtype", [(255, torch.uint8), (256, torch.uint16), (65535, torch.uint16),
                                          (65536, torch.int32), (2**31, torch.int64)])
def test_index_dtype_is_the_narrowest_that_fits(value, dtype):
    assert index_dtype(value) == dtype


@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.9])
def test_mlp_csr_file_is_never_larger_than_dense(tmp_path, mlp_spec, sparsity):
    model = mlp_spec.make()
    prune_model(model, PruningPlan("magnitude", sparsity, exclude_output=False), mlp_spec.example_inputs(2))
    strip_masks(model)
    save_weights(model.state_dict(), tmp_path / "d", "dense")
    save_weights(model.state_dict(), tmp_path / "c", "compact")
    dense, compact = (tmp_path / "d").stat().st_size, (tmp_path / "c").stat().st_size
    assert compact <= dense
    if sparsity == 0.0:
        assert compact == dense
    if sparsity == 0.9:
        assert compact <= 0.14 * dense


def _write_csr_file(path):
    weight = torch.zeros(300, 300)
    weight[::7, ::11] = 2.0
    save_weights({"w": weight}, path, "compact")
    return weight


def _flipped(index):
    return index.to(torch.int64).flip(0).to(index.dtype)  # uint16 has no flip kernel


def _rewrite(path, mutate):
    """Re-save a file's raw parts after `mutate(tensors, metadata)` changed them (tampering)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    mutate(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    _write_csr_file(path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ArtifactError, match="cannot read weights file"):
        load_weights(path)


def test_corrupted_header_length_is_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    _write_csr_file(path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        load_weights(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t, m: t.__setitem__("w::col", t["w::col"].clone().fill_(400)), "column index out of range"),
        (lambda t, m: t.__setitem__("w::crow", _flipped(t["w::crow"])), "row pointers"),
        (lambda t, m: t.__setitem__("w::values", t["w::values"][:-1].contiguous()), "row pointers do not span"),
        (lambda t, m: t.pop("w::col"), "missing parts"),
        (lambda t, m: t.__setitem__("extra::values", torch.ones(2)), "parts without an encoding record"),
        (lambda t, m: m.__setitem__("encodings", "{not json"), "malformed encodings"),
        (lambda t, m: m.__setitem__("encodings", json.dumps({"w": {"kind": "zip"}})), "unknown encoding"),
        (lambda t, m: m.__setitem__("format", "other"), "not a deploykit weights file"),
        (lambda t, m: t.__setitem__("w::values", t["w::values"].double()), "values are float64"),
        (lambda t, m: t.__setitem__("w::col", t["w::col"].float()), "must be a 1-D integer index"),
    ],
)
def test_tampered_csr_files_are_rejected(tmp_path, mutate, message):
    path = tmp_path / "w.safetensors"
    _write_csr_file(path)
    _rewrite(path, mutate)
    with pytest.raises(ArtifactError, match=message):
        load_weights(path)


def test_unsorted_columns_are_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    _write_csr_file(path)

    def swap(tensors, metadata):
        col = tensors["w::col"].to(torch.int64)
        col[[0, 1]] = col[[1, 0]]
        tensors["w::col"] = col.to(torch.uint16)

    _rewrite(path, swap)
    with pytest.raises(ArtifactError, match="not strictly increasing"):
        load_weights(path)


def test_bitmask_with_wrong_count_or_padding_is_rejected(tmp_path):
    path = tmp_path / "w.safetensors"
    weight = torch.randn(100, 69)
    weight[:, ::2] = 0
    save_weights({"w": weight}, path, "compact")
    assert load_weights(path)["w"].equal(weight)

    def set_padding(tensors, metadata):
        mask = tensors["w::mask"].clone()
        mask[-1] |= 1  # 6900 elements use 4 bits of the last byte; the lowest bit is padding
        tensors["w::mask"] = mask

    _rewrite(path, set_padding)
    with pytest.raises(ArtifactError, match="padding bits are set"):
        load_weights(path)


def test_missing_file_and_plain_safetensors_are_rejected(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ArtifactError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ArtifactError, match="not a deploykit weights file"):
        load_weights(tmp_path / "plain.safetensors")


def test_reserved_separator_in_names_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved separator"):
        save_weights({"a::b": torch.ones(2)}, tmp_path / "w", "compact")


def test_tied_tensors_are_stored_once_and_come_back_under_both_names(tmp_path):
    shared = torch.randn(50, 8)
    state = {"wte.weight": shared, "lm_head.weight": shared, "other": torch.randn(3)}
    save_weights(state, tmp_path / "w", "dense")
    save_weights({"wte.weight": shared, "other": state["other"]}, tmp_path / "single", "dense")
    loaded = load_weights(tmp_path / "w")
    assert torch.equal(loaded["lm_head.weight"], shared) and torch.equal(loaded["wte.weight"], shared)
    size, single = (tmp_path / "w").stat().st_size, (tmp_path / "single").stat().st_size
    assert single < size < single + 200  # one copy of the data; the alias costs only metadata

    def dangling(tensors, metadata):
        metadata["aliases"] = json.dumps({"lm_head.weight": "missing"})

    _rewrite(tmp_path / "w", dangling)
    with pytest.raises(ArtifactError, match="alias 'lm_head.weight' -> 'missing' does not name one stored tensor"):
        load_weights(tmp_path / "w")


def test_compression_shrinks_redundant_tensors_and_rejects_tampering(tmp_path):
    state = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64) % 7 + 1}
    save_weights(state, tmp_path / "plain", "dense")
    save_weights(state, tmp_path / "z", "dense", compression="zlib")
    assert (tmp_path / "z").stat().st_size < 0.2 * (tmp_path / "plain").stat().st_size
    assert torch.equal(load_weights(tmp_path / "z")["w"], state["w"])

    def grow(tensors, metadata):
        records = json.loads(metadata["compressed"])
        records["w"]["shape"] = [32, 64]  # claims fewer bytes than the data holds
        metadata["compressed"] = json.dumps(records)

    _rewrite(tmp_path / "z", grow)
    with pytest.raises(ArtifactError, match="compressed entry 'w' does not decompress"):
        load_weights(tmp_path / "z")
    with pytest.raises(ValueError, match="unknown compression 'zip'"):
        save_weights(state, tmp_path / "q", "compact", compression="zip")


def test_csr_column_indices_reach_the_last_column_at_a_dtype_boundary(tmp_path):
    # 257 columns: index 256 needs uint16; one too narrow a dtype would wrap it to column 0
    weight = torch.zeros(1000, 257)
    weight[0, 256], weight[1, 255], weight[999, 0] = 1.5, -2.0, 3.0
    (encoded,) = save_weights({"w": weight}, tmp_path / "w.safetensors", "compact")
    assert encoded.kind == "csr" and encoded.parts["col"].dtype == torch.uint16
    assert torch.equal(load_weights(tmp_path / "w.safetensors")["w"], weight)
