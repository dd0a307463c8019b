"""The rollout stage: inference servers that sample from pi_mix, the engines behind them, and a client.

- ``engine``: the ``Engine`` protocol a server drives, and ``TorchEngine`` (two Hugging Face Llama models, each
  with its own KV cache, batched decoding, sampling from pi_mix). ``vllm_engine.VLLMEngine`` implements the same
  protocol with vLLM (``vllm_model``: both stacks in one out-of-tree vLLM model; ``vllm_plugin``: its
  ``vllm.general_plugins`` registration, which also makes release bundles servable by vLLM).
- ``server``: the OpenAI-style HTTP server (``python -m nemo_logitavg.rollout.server``); ``requests``: what it
  accepts (schemas, ``ServerLimits``, the checks); ``responses``: what it answers.
- ``client``: ``RolloutClient``, what the trainer calls (concurrency, retries, fail-over, step checks).
- ``process``: start and stop a server as a child process (recipes).
- ``weight_wire``: the wire format of the collective policy push (weight-update groups, bucket plans, the
  broadcasts), shared by both ends; ``weight_receiver``: the servers' end (``WeightReceiver``). The trainer's end,
  ``nemo_logitavg.trainer.weight_sender.PolicyPusher``, broadcasts each pipeline stage's Hugging Face-named tensors,
  bucket by bucket, into every server's engine over a weight-update group of its own
  (``GRPOTrainer.push_policy``); nothing is written to disk per step.

Layering: nothing here imports megatron or the trainer (the servers run without either).

Imports are lazy so that ``import nemo_logitavg.rollout.client`` loads neither transformers nor torch.
"""

from __future__ import annotations

__all__ = ["Engine", "TorchEngine", "VLLMEngine", "RolloutClient", "RolloutError"]


# Lazy (PEP 562): `import nemo_logitavg.rollout.client` must load neither torch nor transformers, nor vLLM.
def __getattr__(name: str):
    if name in ("Engine", "TorchEngine"):
        from nemo_logitavg.rollout import engine

        return getattr(engine, name)
    if name == "VLLMEngine":  # imports vLLM only when an engine is built
        from nemo_logitavg.rollout import vllm_engine

        return vllm_engine.VLLMEngine
    if name in ("RolloutClient", "RolloutError"):
        from nemo_logitavg.rollout import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
