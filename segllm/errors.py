"""Errors raised for bad input. Each names the problem so a user can fix it."""


class SegLLMError(ValueError):
    """Base class of every error this package raises for bad input."""


class ConfigError(SegLLMError):
    """A configuration with an unknown key, a wrong type or an inconsistent value."""


class ConversationError(SegLLMError):
    """A malformed conversation: an empty question, a reference to a round that does not exist, ..."""


class ImageError(SegLLMError):
    """An image that cannot be read or used."""


class MaskError(SegLLMError):
    """A mask that cannot be used (wrong size, empty where a mask is needed)."""


class PlaceholderMismatchError(SegLLMError):
    """The number of placeholder tokens differs from the number of features to put there."""


class ContextTooLongError(SegLLMError):
    """The rendered conversation does not fit the LLM's context."""


class CheckpointError(SegLLMError):
    """A checkpoint folder that is missing files, has missing/unexpected keys or wrong shapes."""
