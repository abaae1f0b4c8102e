"""The csr kernel rule, pinned with scripted timings (the rule, not the clock): small or
insufficiently sparse layers are never candidates, CSR needs a clear win in every interleaved round,
and noise keeps a layer dense and says so."""

import pytest
import torch
from torch import nn

from deploykit.convert import kernel_choice
from deploykit.convert.kernel_choice import MARGIN, ROUNDS, KernelTimings, Round, decide, decide_layer, time_interleaved
from deploykit.convert.sparse import CSRLinear, choose_kernels, to_sparse_modules


def _sparse_linear(out_features, in_features, sparsity, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight[torch.rand(out_features, in_features) < sparsity] = 0
    return layer


def _timings(dense_ms, csr_ms, min_share=0.9):
    return KernelTimings(tuple(Round(m, m * min_share) for m in dense_ms), tuple(Round(m, m * min_share) for m in csr_ms))


def test_a_clear_win_in_every_round_is_csr():
    choice, noisy, reason = decide(_timings([1.0] * ROUNDS, [0.5] * ROUNDS))
    assert (choice, noisy) == ("csr", False) and "0.50x" in reason


def test_a_win_in_some_rounds_only_is_noise_and_stays_dense():
    csr = [0.5] * (ROUNDS - 1) + [1.2]  # one round where a burst of load hit CSR (or spared dense)
    choice, noisy, reason = decide(_timings([1.0] * ROUNDS, csr))
    assert (choice, noisy) == ("dense", True)
    assert f"in {ROUNDS - 1} of {ROUNDS} rounds only" in reason


def test_preempted_rounds_keep_the_layer_dense():
    # medians at a scheduler tick, far above each round's fastest call: the 2-core machine's 4 ms quantum
    timings = KernelTimings(tuple(Round(8.0, 0.05) for _ in range(ROUNDS)), tuple(Round(3.99, 0.01) for _ in range(ROUNDS)))
    choice, noisy, reason = decide(timings)
    assert (choice, noisy) == ("dense", True) and "preempted" in reason


def test_a_margin_not_met_is_dense_and_not_noisy():
    choice, noisy, _ = decide(_timings([1.0] * ROUNDS, [1.0 - MARGIN / 2] * ROUNDS))
    assert (choice, noisy) == ("dense", False)


def test_spread_rounds_without_a_win_are_called_noisy():
    choice, noisy, reason = decide(_timings([1.0, 2.0, 1.0, 3.0, 1.0, 2.5, 1.0], [3.5] * ROUNDS))
    assert (choice, noisy) == ("dense", True) and "spread" in reason


def test_rounds_alternate_which_kernel_goes_first():
    order = []
    time_interleaved(lambda: order.append("dense"), lambda: order.append("csr"), rounds=4,
                     timer=lambda call: (call(), Round(1.0, 1.0))[1])
    assert order == ["dense", "csr", "csr", "dense", "dense", "csr", "csr", "dense"]


@pytest.mark.parametrize("shape, sparsity, batch", [
    ((64, 64), 0.999, 1),  # a small layer: CSR never won by a margin, whatever the sparsity
    ((256, 256), 0.99, 32),
    ((1024, 1024), 0.85, 1),  # below the batch-1 threshold of its class
    ((1024, 1024), 0.5, 32),  # below the batched threshold
])
def test_layers_below_the_candidate_threshold_are_never_timed_nor_converted(shape, sparsity, batch):
    layer = _sparse_linear(*shape, sparsity)

    def timer(call):
        raise AssertionError("a layer that cannot win must not be timed")

    decision = decide_layer(layer, CSRLinear(layer), torch.randn(batch, shape[1]), batch, timer=timer)
    assert decision["choice"] == "dense" and decision["noisy"] is False
    assert decision["reason"].startswith("not timed: a ")


def test_a_candidate_is_timed_interleaved_and_keeps_its_raw_rounds():
    layer = _sparse_linear(1024, 1024, 0.98)
    # the order time_interleaved takes the kernels in: dense first in even rounds, CSR first in odd ones
    order = iter([kind for i in range(ROUNDS) for kind in (("dense", "csr") if i % 2 == 0 else ("csr", "dense"))])
    medians = {"dense": 2.0, "csr": 0.4}
    decision = decide_layer(layer, CSRLinear(layer), torch.randn(32, 1024), 32,
                            timer=lambda call: Round(medians[kind := next(order)], 0.9 * medians[kind]))
    assert decision["choice"] == "csr" and decision["noisy"] is False
    assert decision["dense_rounds_ms"] == [2.0] * ROUNDS and decision["csr_rounds_ms"] == [0.4] * ROUNDS


def test_another_batch_or_thread_count_is_decided_again_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path))
    model = nn.Sequential(_sparse_linear(1024, 1024, 0.99), nn.ReLU(), nn.Linear(1024, 4)).eval()
    calls = []

    def timer(call):  # CSR five times faster; rounds take the kernels as dense, csr, then csr, dense
        round_, position = divmod(len(calls), 2)
        calls.append(call)
        kind = ("dense", "csr")[position] if round_ % 2 == 0 else ("csr", "dense")[position]
        return Round(1.0, 0.9) if kind == "dense" else Round(0.2, 0.19)

    monkeypatch.setattr(kernel_choice, "_timed_round", lambda call: timer(call))
    recipe = {"kernels": {"0": {"choice": "dense", "noisy": False}}, "kernel_batch": 1, "threads": torch.get_num_threads()}
    same, chosen = to_sparse_modules(_copy(model), (torch.randn(1, 1024),), recipe)
    assert chosen == [] and calls == []  # the recorded decision holds for its own batch and threads
    other, chosen = to_sparse_modules(_copy(model), (torch.randn(16, 1024),), recipe)
    assert len(calls) == 2 * ROUNDS and list(tmp_path.glob("kernels/*.json")) and chosen == ["0"]
    again, chosen_again = to_sparse_modules(_copy(model), (torch.randn(16, 1024),), recipe)
    assert len(calls) == 2 * ROUNDS and chosen_again == chosen  # the cache answered


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_noisy_decisions_are_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path))
    model = nn.Sequential(_sparse_linear(1024, 1024, 0.99)).eval()
    monkeypatch.setattr(kernel_choice, "_timed_round", lambda call: (call(), Round(8.0, 0.01))[1])
    decisions = choose_kernels(model, (torch.randn(4, 1024),), cache=True)
    assert decisions["0"]["noisy"] and decisions["0"]["choice"] == "dense"
    assert not list(tmp_path.glob("kernels/*.json"))
