"""The user's standing consent to run an artifact's bundled code: `deploykit trust DIR`.

An artifact exported from a file entry point carries its code (`deploykit.model.entrypoint.bundle_files`);
rebuilding its PyTorch model runs that code, which deploykit does only with the user's consent
(`deploykit.model.sources.code_refusal`). `--trust-code` consents to everything for one command;
`deploykit trust DIR` records consent to the exact code of one artifact (the digest of its files) in
the user's config, so the user's own artifacts need no flag each time, and any change to the code
needs consent again. Entries are listed (`trust --list`) and revocable (`trust --revoke`).

The file is the user's own, but read like any input: a damaged or edited one is refused in one line,
never half-believed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from deploykit.core.errors import UsageError
from deploykit.core.fsutil import write_text_atomic
from deploykit.model.artifact import read_manifest, verify_artifact
from deploykit.model.entrypoint import bundled_code_digest
from deploykit.model.sources import CODE_DIGEST_PREFIX

FILE_NAME = "trusted-code.json"
SCHEMA = "deploykit.trust/1"
_HEX = set("0123456789abcdef")


@dataclass(frozen=True)
class TrustEntry:
    #: `code_digest` of the bundled files consented to
    sha256: str
    model: str
    entry_point: str
    #: where the artifact was when it was trusted (what `--list` shows; consent follows the digest)
    artifact: str
    trusted_utc: str


def trust_file() -> Path:
    """$DEPLOYKIT_CONFIG/trusted-code.json, else ~/.config/deploykit/trusted-code.json."""
    root = os.environ.get("DEPLOYKIT_CONFIG") or Path.home() / ".config" / "deploykit"
    return Path(root) / FILE_NAME


def read_trusted(path: Path | None = None) -> list[TrustEntry]:
    """The recorded consents (none where the file does not exist yet)."""
    path = path or trust_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise UsageError(f"the trust file {str(path)!r} cannot be read ({exc}): fix or remove it") from None
    fields = [f for f in TrustEntry.__dataclass_fields__]
    entries = data.get("trusted") if isinstance(data, dict) and data.get("schema") == SCHEMA else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and sorted(e) == sorted(fields) and all(isinstance(v, str) for v in e.values())
            and len(e["sha256"]) == 64 and set(e["sha256"]) <= _HEX for e in entries):
        raise UsageError(f"the trust file {str(path)!r} is not one deploykit wrote (schema {SCHEMA}): fix or remove it")
    return [TrustEntry(**e) for e in entries]


def trusted_consent(path: Path | None = None) -> tuple[str, ...]:
    """The consent tokens of every trusted digest, as `code_refusal` reads them."""
    return tuple(CODE_DIGEST_PREFIX + e.sha256 for e in read_trusted(path))


def _write(entries: list[TrustEntry], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"schema": SCHEMA, "trusted": [asdict(e) for e in entries]}, indent=2) + "\n")


def trust_artifact(directory: str | Path, path: Path | None = None) -> tuple[TrustEntry, bool]:
    """Record consent to the code `directory` bundles: (the entry, whether it is new). The artifact is
    verified first (every file against its checksum), and the digest computed from its files."""
    directory = Path(directory)
    path = path or trust_file()
    manifest = read_manifest(directory)
    verify_artifact(directory, manifest)
    if manifest.source.get("kind") != "entry-point":
        raise UsageError(f"{str(directory)!r} runs no code of its own (its model comes from "
                         f"{manifest.source.get('kind', 'the zoo')}): there is nothing to trust")
    digest = bundled_code_digest(directory, manifest.source)
    if digest is None:
        raise UsageError(f"{str(directory)!r} names its code ({manifest.source.get('entry_point')}) instead of "
                         "bundling it, so there is no fixed code to trust: re-export it with --bundle-code (a file "
                         "entry point), or use --trust-code")
    entries = read_trusted(path)
    for entry in entries:
        if entry.sha256 == digest:
            return entry, False
    entry = TrustEntry(digest, manifest.model, str(manifest.source.get("entry_point")), str(directory.resolve()),
                       _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    _write([*entries, entry], path)
    return entry, True


def revoke(target: str, path: Path | None = None) -> list[TrustEntry]:
    """Remove the consent to an artifact's code (`target` a DIR) or to a digest (`target` its hex, or a
    prefix of 8 or more characters naming one entry); the entries removed."""
    path = path or trust_file()
    entries = read_trusted(path)
    if Path(target).is_dir():
        manifest = read_manifest(Path(target))
        digest = bundled_code_digest(Path(target), manifest.source)
        removed = [e for e in entries if e.sha256 == digest]
    else:
        if len(target) < 8 or not set(target) <= _HEX:
            raise UsageError(f"--revoke takes an artifact directory or a SHA-256 (at least 8 hex digits) from "
                             f"`deploykit trust --list`, got {target!r}")
        removed = [e for e in entries if e.sha256.startswith(target)]
        if len(removed) > 1:
            raise UsageError(f"{target!r} names {len(removed)} trusted digests: give more of it")
    if not removed:
        raise UsageError(f"{target!r} is not trusted (see `deploykit trust --list`)")
    _write([e for e in entries if e not in removed], path)
    return removed
