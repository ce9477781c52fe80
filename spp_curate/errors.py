"""Errors a user can act on.

A :class:`UserError` carries a one-line message that the CLI prints as is,
without a traceback. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KeyRefused(OSError):
    """A key a source cannot hold (absolute, ``..``, a symlink out of its root, another split's row):
    refused before anything outside the source is touched."""


class UserError(Exception):
    """A problem with the user's input: a wrong option, a missing file, a bad release."""

    def __init__(self, message: str, option: str | None = None) -> None:
        self.option = option
        super().__init__(f"{option}: {message}" if option else message)


def brief(text: object, limit: int = 160) -> str:
    """``text`` (an exception or a string) as one line of at most about ``limit`` characters, cut between words
    (never mid-word) and marked with an ellipsis where cut; an exception with no message gives its type's name."""
    if isinstance(text, BaseException):
        text = str(text) or type(text).__name__
    words = " ".join(str(text).split())
    if len(words) <= limit:
        return words
    cut = words.rfind(" ", 0, limit + 1)
    return (words[:cut] if cut > limit // 2 else words[:limit]).rstrip(" ,;:(") + " …"
