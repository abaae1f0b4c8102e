"""From a stripped model to what ships: the forms (dense, csr, dense-shrunk) and the shrinking through
dependency groups, csr's measured kernel choice, the quantizers, and torch -> ONNX export with its
parity check (the single-graph exporter and the tolerances).

May import `deploykit.prune`, `deploykit.model` and `deploykit.core`.
"""
