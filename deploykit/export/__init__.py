"""The export step users run (`deploykit export`, and every configuration of `deploykit bench`): build,
prune, strip, convert, export through the model's pipeline, check, quantize if asked, and write the
artifact directory atomically with its manifest (`build.export_artifact`, `quantization`).

May import `deploykit.pipelines` and everything below it.
"""
