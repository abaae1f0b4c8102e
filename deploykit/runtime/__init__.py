"""Running an artifact: the session protocol every runtime implements, the registered runtimes and
their devices, rebuilding an artifact's PyTorch model (`loading`), the PyTorch session, device
placement, and hardware profiles (the built-in TOML files live in `hardware/`).

May import `deploykit.convert` and everything below it.
"""
