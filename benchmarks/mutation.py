"""Mutation check of the core: does the test suite notice when pruning counts, storage encodings or
parity checks are wrong?

Each mutant below is one hand-made change of one line, the kind of bug a refactor brings in (an
operator flipped, a bound off by one, the wrong method). For each, the script copies the package
and the tests into a scratch directory, applies the change there (never to this checkout), runs the
test files that cover that code, and counts the mutant as killed when they fail. Hand-made rather
than mutmut's generated mutants: mutmut 3 rewrites every function into a trampoline and runs the
whole suite per mutant, hours on this machine; a dozen targeted mutants of the three concepts the
issue names take minutes and each says what it would break.

    python benchmarks/mutation.py                 # all mutants; table, and results/mutation.json
    python benchmarks/mutation.py --only M3,M7    # some of them
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    area: str
    file: str  # relative to the repository
    original: str  # must occur exactly once in the file
    mutated: str
    tests: tuple[str, ...]
    what: str


PRUNE_TESTS = ("tests/test_prune.py",)
STORAGE_TESTS = ("tests/test_storage.py",)
PARITY_TESTS = ("tests/test_export.py",)

MUTANTS = (
    Mutant("M1", "pruning counts", "deploykit/prune/base.py",
           'PRUNERS.add("magnitude", UnstructuredPruner("l1_unstructured"))',
           'PRUNERS.add("magnitude", UnstructuredPruner("random_unstructured"))', PRUNE_TESTS,
           "magnitude pruning zeroes random weights"),
    Mutant("M2", "pruning counts", "deploykit/prune/base.py",
           'if ctx.plan.scope == "global":', 'if ctx.plan.scope != "global":', PRUNE_TESTS,
           "global and per-layer scope swapped"),
    Mutant("M3", "pruning counts", "deploykit/prune/base.py",
           "    return order[-1:]", "    return order[:1]", PRUNE_TESTS,
           "the first layer, not the last, is taken for the output layer"),
    Mutant("M4", "pruning counts", "deploykit/core/sparsity.py",
           "nonzero=int(torch.count_nonzero(tensor)),", "nonzero=int(torch.count_nonzero(tensor)) - 1,",
           PRUNE_TESTS, "the sparsity table miscounts nonzeros by one"),
    Mutant("M5", "storage encodings", "deploykit/core/storage.py",
           "        if max_value <= limit:", "        if max_value < limit:", STORAGE_TESTS,
           "an index at a dtype's limit is given the next wider dtype"),
    Mutant("M6", "storage encodings", "deploykit/core/storage.py",
           "torch.cumsum(counts, dim=0, out=crow[1:])", "torch.cumsum(counts, dim=0, out=crow[:-1])",
           STORAGE_TESTS, "CSR row pointers shifted by one row"),
    Mutant("M7", "storage encodings", "deploykit/core/storage.py",
           "    return min(candidates, key=lambda enc: (enc.cost, enc.kind != \"dense\"))",
           "    return max(candidates, key=lambda enc: (enc.cost, enc.kind != \"dense\"))", STORAGE_TESTS,
           "the largest encoding is chosen instead of the smallest"),
    Mutant("M8", "storage encodings", "deploykit/core/storage.py",
           '"col": col.to(index_dtype(max(matrix.shape[1] - 1, 0))),',
           '"col": col.to(index_dtype(max(matrix.shape[1] - 2, 0))),', STORAGE_TESTS,
           "column indices sized one short (the last column overflows at a dtype boundary)"),
    Mutant("M9", "storage encodings", "deploykit/core/storage.py",
           "    bits = np.unpackbits(mask.numpy())", "    bits = np.unpackbits(mask.numpy(), bitorder=\"little\")",
           STORAGE_TESTS, "the bitmask is read in the wrong bit order"),
    Mutant("M10", "parity checks", "deploykit/convert/onnx_export.py",
           "    if not errors[worst] <= tolerance:  # also catches NaN",
           "    if errors[worst] > tolerance:  # also catches NaN", PARITY_TESTS,
           "a NaN error passes the parity check"),
    Mutant("M11", "parity checks", "deploykit/convert/onnx_export.py",
           "    worst = max(errors, key=lambda name: errors[name])",
           "    worst = min(errors, key=lambda name: errors[name])", PARITY_TESTS,
           "only the best output is checked"),
    Mutant("M12", "parity checks", "deploykit/convert/onnx_export.py",
           "            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))",
           "            diff = out.astype(np.float64) - ref.astype(np.float64)", PARITY_TESTS,
           "negative errors are not errors"),
    Mutant("M13", "parity checks", "deploykit/convert/onnx_export.py",
           "        if ref.shape != out.shape:", "        if ref.size != out.size:", PARITY_TESTS,
           "an output of the wrong shape but the same size passes"),
    Mutant("M14", "parity checks", "deploykit/convert/onnx_export.py",
           "    if len(reference) != len(actual):", "    if len(reference) < len(actual):", PARITY_TESTS,
           "a graph with fewer outputs than the model passes on the ones it has"),
)


def _scratch_copy(target: Path) -> None:
    for name in ("deploykit", "tests"):
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")


def run_mutant(mutant: Mutant, scratch: Path, timeout_s: float) -> dict:
    path = scratch / mutant.file
    original = path.read_text(encoding="utf-8")
    if original.count(mutant.original) != 1:
        raise SystemExit(f"{mutant.id}: the line to mutate occurs {original.count(mutant.original)} times in "
                         f"{mutant.file}; update the mutant")
    path.write_text(original.replace(mutant.original, mutant.mutated), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(scratch)}  # the copy, not the installed checkout
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                 *mutant.tests], cwd=scratch, env=env, capture_output=True, text=True,
                                timeout=timeout_s)
        outcome = "killed" if result.returncode != 0 else "survived"
        last = (result.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        outcome, last = "killed (timeout)", f"over {timeout_s:g} s"
    finally:
        path.write_text(original, encoding="utf-8")
    return {**dataclasses.asdict(mutant), "outcome": outcome, "pytest": last,
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutant ids")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's tests")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/mutation.json"))
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.id in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="deploykit-mutation-") as tmp:
        scratch = Path(tmp)
        _scratch_copy(scratch)
        # the unmutated copy must pass, or every "kill" would mean nothing
        for tests in sorted({m.tests for m in chosen}):
            clean = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                                   cwd=scratch, env={**os.environ, "PYTHONPATH": str(scratch)},
                                   capture_output=True, text=True)
            if clean.returncode != 0:
                raise SystemExit(f"the unmutated tests fail ({' '.join(tests)}): fix them first")
        rows = []
        for mutant in chosen:
            print(f"{mutant.id}: {mutant.what}", file=sys.stderr, flush=True)
            rows.append(run_mutant(mutant, scratch, args.timeout))
    killed = sum(r["outcome"].startswith("killed") for r in rows)
    print(tabulate([[r["id"], r["area"], r["what"], r["outcome"], r["pytest"]] for r in rows],
                   headers=["mutant", "area", "change", "outcome", "tests"]))
    by_area = {}
    for r in rows:
        by_area.setdefault(r["area"], []).append(r["outcome"].startswith("killed"))
    print("\n" + "; ".join(f"{area}: {sum(v)}/{len(v)} killed" for area, v in by_area.items())
          + f"; total {killed}/{len(rows)}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"killed": killed, "total": len(rows), "mutants": rows}, indent=2) + "\n")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
