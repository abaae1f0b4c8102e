"""Errors deploykit raises on purpose.

Each carries a message written for the user: the CLI prints it on one line and exits non-zero, with no
traceback. Anything else that escapes is a bug in deploykit: the CLI prints it on one line too, exits 1,
and shows the traceback only with `--debug`.
"""

from __future__ import annotations


class DeployKitError(Exception):
    """Base class: an expected failure with a user-facing message."""

    #: process exit status the CLI uses for this kind of failure
    exit_code = 2


class UsageError(DeployKitError):
    """Bad input: an unknown name, a value out of range, a malformed spec."""


class UnknownNameError(UsageError, KeyError):
    """A name not in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ArtifactError(UsageError):
    """An artifact directory or weights file that is missing, unreadable or malformed."""


class OutputPathError(UsageError):
    """An output path that cannot be written (exists, unwritable, parent missing)."""


class WriteError(DeployKitError):
    """The file system refused a write (disk full, read-only, permissions): not the user's input."""

    exit_code = 1


class IntegrityError(ArtifactError):
    """An artifact's file whose size or checksum is not what its manifest recorded (damaged or edited)."""


class UntrustedCodeError(UsageError):
    """Data (a manifest, a config) names code to import, and the user has not consented to run it."""


class StoreError(DeployKitError):
    """A results store that cannot be written now (locked, damaged); the records went elsewhere."""

    exit_code = 1


class ParityError(DeployKitError):
    """A converted or exported model whose outputs differ from PyTorch's beyond the tolerance."""

    exit_code = 1

    def __init__(self, what: str, output: str, max_abs_error: float, tolerance: float):
        self.what = what
        self.output = output
        self.max_abs_error = max_abs_error
        self.tolerance = tolerance
        super().__init__(
            f"{what} parity failed on output {output!r}: max abs error {max_abs_error:.3g} "
            f"> tolerance {tolerance:.3g}"
        )


class QualityError(DeployKitError):
    """Under --strict: an artifact whose checks prove too little (outputs that do not depend on the
    input) or whose quality dropped."""

    exit_code = 1


class ExportError(DeployKitError):
    """torch.onnx could not export the model; the message carries the exporter's first line."""

    exit_code = 1


class MeasurementError(DeployKitError):
    """A benchmark configuration that could not be measured (its worker process failed)."""

    exit_code = 1
