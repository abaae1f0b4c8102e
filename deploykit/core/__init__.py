"""The bottom layer: what every other layer needs and no concept owns.

Errors and their exit codes, name registries, atomic and confined file access, TOML reading,
machine facts and contention probes, the timing loop (`measure`), onnxruntime sessions made one way
(`ort`), forward hooks, and the weights file format (`storage`). It imports nothing from deploykit
outside itself.
"""
