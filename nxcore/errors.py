"""Errors the engine raises for requests that do not fit its compiled shapes or state."""


class EngineError(ValueError):
    """A request the engine cannot run as given; the message names the value and the limit."""
