"""The bottom layer: what every other layer needs and no concept owns.

Errors and their exit codes, name registries, atomic and confined file access, TOML reading,
machine facts and contention probes, the timing loop (`measure`), onnxruntime sessions made one way
(`ort`), forward hooks, model outputs of every shape flattened to named tensors (`outputs`), and the
weights file format (`storage`). It imports nothing from deploykit outside itself.
"""
