"""The root of Vigie's exceptions. It lives in the bottom layer so that every layer above can share it."""

from __future__ import annotations


class VigieError(Exception):
    """Any error Vigie reports on purpose: the message is meant for an admin."""


class ListError(VigieError):
    """A list source could not be read or holds too many bad lines to be trusted."""


class NameRejected(VigieError):
    """A string is not a domain name Vigie can match."""
