"""What a model is and where it comes from: `ModelSpec` and its inputs, the registered zoo (`zoo`), the
sources a user names (entry points, checkpoints, Hugging Face and ESPnet directories, ONNX files),
how model families are built (`espnet`, `causal_lm`), pruning hints, FLOP summaries, and the
artifact's manifest schema (read, checked and verified without torch).

May import `deploykit.core` only.
"""
