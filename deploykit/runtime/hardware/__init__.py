"""Hardware profiles shipped with deploykit, one TOML file per target machine (see README.md here).

This folder is imported as `deploykit.runtime.hardware` only so that its files ship with the package;
`deploykit.runtime.profiles` reads them.
"""
