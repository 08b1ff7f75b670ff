"""Helpers that build tiny, random MoE models locally (no hub): used by tests, benchmarks and the demo default."""
