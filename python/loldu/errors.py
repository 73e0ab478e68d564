"""One error type per failure family. Every message names the layer, file or shape at fault."""


class LolduError(ValueError):
    """Base class of every error raised by loldu."""


class FactorizationError(LolduError):
    """The truncated LDU factorization cannot be computed (bad rank, dtype, NaN/Inf, tiny pivot)."""


class ShapeError(LolduError):
    """Tensors of inconsistent shapes, dtypes or devices were passed to a loldu op."""


class AdapterError(LolduError):
    """An adapter cannot be injected, loaded, saved or switched (names the layer or file)."""


class ExportError(LolduError):
    """Export to ONNX or running the exported model failed."""


class LolduWarning(UserWarning):
    """Something loldu did differs from what was asked, or may not be what was meant (a target_modules
    entry that matches nothing, a file left stale); the message says what and why."""
