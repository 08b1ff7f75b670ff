"""Channel slimming with `--offload` (placeholder: refused until the streamed slimmer lands)."""

from __future__ import annotations


def check_streamable_slim(slim) -> None:
    raise ValueError("channel slimming (slim:) runs in memory only; drop --offload")
