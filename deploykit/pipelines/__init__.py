"""What exporting and running a kind of model means, one `Pipeline` object per kind (`forward`,
`speech_translation`, `text_generation`, `onnx_file`), each owning its exporter, its session loader
per runtime, its benchmark inputs, its reference and the quantizers that apply; `catalog` registers
them all. The torch side of each (`espnet`, `gpt2`) and the onnxruntime side (`st_decode`,
`textgen`) live beside them.

May import `deploykit.runtime` and everything below it.
"""
