"""The DNS front: an asyncio UDP+TCP server that asks the shared engine, then answers or forwards."""
