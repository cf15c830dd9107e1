"""The HTTP(S) front: a mitmproxy addon that asks the shared engine (issue #5)."""
