"""Errors the engine raises: for requests that do not fit its compiled shapes or state, and when
it cannot go on."""


class EngineError(ValueError):
    """A request the engine cannot run as given; the message names the value and the limit."""


class TPRankError(RuntimeError):
    """A TP rank died or failed; the engine cannot continue."""
