"""The error every kernel raises when it cannot run here."""


class KernelUnavailable(RuntimeError):
    """The requested fast path cannot run here; the message says why and what to do."""
