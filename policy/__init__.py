"""The shared core: rules model and validation, schedules, client identification, decide(), state views.

It imports no front: the DNS resolver and the HTTP proxy both build a Query and act on the Decision.
"""
