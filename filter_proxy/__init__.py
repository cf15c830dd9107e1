"""The HTTP(S) front: a mitmproxy addon that asks the shared engine, and the server that runs it."""
