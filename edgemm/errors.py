"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class EdgemmError(Exception):
    """A mistake the user can fix (bad input, bad bundle, unsupported config)."""


class UnsupportedVariant(EdgemmError):
    """A model variant that a component (the reference model or an exporter) cannot compute."""

    def __init__(self, variant: str, where: str, targets: str = ""):
        msg = f"{where} does not support the model variant '{variant}'"
        if targets:
            msg += f"; targets that can: {targets}"
        super().__init__(msg)
        self.variant = variant
