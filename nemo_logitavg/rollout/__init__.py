"""The rollout stage: inference servers that sample from pi_mix, the engines behind them, a client, weight sync.

- ``engine``: the ``Engine`` protocol a server drives, and ``TorchEngine`` (two Hugging Face Llama models, each
  with its own KV cache, batched decoding, sampling from pi_mix). A vLLM engine implements the same protocol.
- ``server``: the OpenAI-style HTTP server (``python -m nemo_logitavg.rollout.server``).
- ``client``: ``RolloutClient``, what the trainer calls (concurrency, retries, fail-over, step checks).
- ``weight_sync``: ``write_policy_for_servers``, the trainer side of a weight push.

Imports are lazy so that ``import nemo_logitavg.rollout.client`` does not load transformers.
"""

from __future__ import annotations

__all__ = ["Engine", "TorchEngine", "RolloutClient", "RolloutError", "write_policy_for_servers"]


def __getattr__(name: str):
    if name in ("Engine", "TorchEngine"):
        from nemo_logitavg.rollout import engine

        return getattr(engine, name)
    if name in ("RolloutClient", "RolloutError"):
        from nemo_logitavg.rollout import client

        return getattr(client, name)
    if name == "write_policy_for_servers":
        from nemo_logitavg.rollout.weight_sync import write_policy_for_servers

        return write_policy_for_servers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
