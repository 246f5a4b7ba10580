"""Errors raised by the quantization core. Every message names the layer and the problem."""


class QuantizationError(ValueError):
    """A model, plan or file cannot be quantized / loaded as asked; nothing was changed."""


class QuantFileError(QuantizationError):
    """A quantized-model file is corrupt, truncated, from another format, or does not fit the model."""
