"""What exporting and running a kind of model means, one `Pipeline` object per kind (`forward`,
`optimum_forward`, `speech_translation`, `text_generation`, `text2text_generation`, `onnx_file`), each
owning its exporter, its session loader per runtime, its benchmark inputs, its reference and the
quantizers that apply; `catalog` registers them all. The torch side of each (`espnet`,
`hf_generation`, `optimum_export`) and the onnxruntime side (`st_decode`, `textgen`,
`seq2seq_decode`) live beside them.

May import `deploykit.runtime` and everything below it.
"""
