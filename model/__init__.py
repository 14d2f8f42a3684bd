"""Atoms: tiny decoder-only transformers over quantized state tokens.

No database or network code lives here: bytes and tensors in, bytes and numbers out, so the
agents, the benchmarks and the tests all use it directly.
"""
