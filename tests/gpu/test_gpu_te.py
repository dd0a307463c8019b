"""The actor with Transformer Engine's layer spec (what ``models/builder.py`` picks when TE imports and CUDA is there,
as on the cluster's NeMo container) against the local spec on the same weights: log pi_mix within bf16 tolerance."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed
from tests.gpu import GPU, inner_timeout, needs_module
from tests.tiny_models import make_hf_llama

pytestmark = [*GPU, needs_module("transformer_engine")]


def _spec_worker(spec: str, policy_dir: str, reference_dir: str) -> dict:
    from nemo_logitavg.models import LlamaConfig, builder
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, teardown
    from tests.test_actor import micro_batches

    if spec == "local":  # what _layer_spec gives without TE
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        builder._layer_spec = lambda: get_gpt_layer_local_spec(normalization="RMSNorm")
    init_parallel()
    try:
        actor = LogitAveragingActor(LlamaConfig.from_hf(policy_dir), LlamaConfig.from_hf(reference_dir),
                                    ActorConfig(ref_weight=0.5, params_dtype=torch.bfloat16))  # fmt: skip
        actor.load_hf(policy_dir, reference_dir)
        modules = {type(m).__module__.split(".")[0] for m in actor.gpt_policy.modules()}
        results = actor.forward_backward(micro_batches(), forward_only=True)
        return {"te_modules": "transformer_engine" in modules,
                "logprobs": [r["logprobs"].float().cpu() for r in results]}  # fmt: skip
    finally:
        teardown()


def test_te_spec_logprobs_match_the_local_spec(tmp_path):
    dirs = make_hf_llama(tmp_path / "policy", seed=1), make_hf_llama(tmp_path / "reference", seed=2)
    kwargs = dict(policy_dir=dirs[0], reference_dir=dirs[1])
    (te,) = run_distributed(_spec_worker, 1, timeout_s=inner_timeout("te") / 2, spec="te", **kwargs)
    (local,) = run_distributed(_spec_worker, 1, timeout_s=inner_timeout("te"), spec="local", **kwargs)
    assert te["te_modules"], "transformer_engine imports but the actor was not built with its layers"
    assert not local["te_modules"]
    worst = max((a - b).abs().max().item() for a, b in zip(te["logprobs"], local["logprobs"], strict=True))
    print(f"[smoke] TE spec vs local spec, bf16 on {torch.cuda.get_device_name(0)}: max|diff log pi_mix| = {worst:.3e}")
    assert worst <= 0.1  # two bf16 computations of the tiny model's 4 layers (each within 0.1 of float64)
