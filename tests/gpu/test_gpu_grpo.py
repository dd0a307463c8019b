"""The actor in bfloat16 on one GPU (local layer spec, NCCL world size 1), and 3 GRPO steps through recipes/grpo.py
with its torch-engine rollout server on the same GPU."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.distributed import run_distributed
from tests.gpu import GPU, inner_timeout
from tests.tiny_models import make_hf_llama, make_llama_with_tokenizer

pytestmark = GPU
ROOT = Path(__file__).resolve().parents[2]


def _bf16_actor_worker(policy_dir: str, reference_dir: str) -> dict:
    import torch.distributed as dist

    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, rank_device, teardown
    from tests.test_actor import micro_batches, weighted_loss

    init_parallel()
    cfg = LlamaConfig.from_hf(policy_dir)
    actor = LogitAveragingActor(cfg, LlamaConfig.from_hf(reference_dir),
                                ActorConfig(ref_weight=0.5, lr=1e-2, params_dtype=torch.bfloat16))  # fmt: skip
    actor.load_hf(policy_dir, reference_dir)
    placement = {(p.device, p.dtype) for m in (actor.gpt_policy, actor.reference) for p in m.parameters()}
    batches = micro_batches()  # host tensors
    reference_before = {k: v.clone() for k, v in actor.reference.state_dict().items() if "extra_state" not in k}
    results = actor.forward_backward(batches, weighted_loss)
    applied, grad_norm = actor.optimizer_step()
    reference_after = actor.reference.state_dict()
    out = {
        "device": rank_device(),
        "backend": dist.get_backend(),
        "placement": placement,
        "logprobs": [r["logprobs"].float().cpu() for r in results],
        "logprob_devices": {r["logprobs"].device for r in results},
        "applied": applied,
        "grad_norm": grad_norm,
        "finite": actor.weights_finite(),
        "reference_unchanged": all(torch.equal(v, reference_after[k]) for k, v in reference_before.items()),
    }
    teardown()
    return out


def test_bf16_actor_on_one_gpu(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.test_actor import micro_batches

    dirs = make_hf_llama(tmp_path / "policy", seed=1), make_hf_llama(tmp_path / "reference", seed=2)
    (result,) = run_distributed(_bf16_actor_worker, world_size=1, timeout_s=inner_timeout("grpo"), policy_dir=dirs[0],
                                reference_dir=dirs[1])  # fmt: skip
    assert result["device"] == torch.device("cuda", 0) and "nccl" in result["backend"]
    assert result["placement"] == {(torch.device("cuda", 0), torch.bfloat16)}
    assert result["logprob_devices"] == {torch.device("cuda", 0)}
    assert result["applied"] and math.isfinite(result["grad_norm"]) and result["finite"]
    assert result["reference_unchanged"]
    # Independent: transformers in float64 on the same bf16-rounded weights, logits averaged densely.
    models = []
    for path in dirs:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16).double()
        models.append(model.double())
    worst = 0.0
    for batch, logprobs in zip(micro_batches(), result["logprobs"], strict=True):
        with torch.no_grad():
            mixed = 0.5 * models[0](batch["input_ids"]).logits + 0.5 * models[1](batch["input_ids"]).logits
        expected = torch.log_softmax(mixed, -1).gather(-1, batch["targets"][..., None])[..., 0]
        worst = max(worst, (logprobs.double() - expected).abs().max().item())
    print(f"[smoke] bf16 actor on {torch.cuda.get_device_name(0)}: max|log pi_mix - float64| = {worst:.3e}")
    assert worst <= 0.1  # bf16 activations through the tiny model's 4 layers, well above the float32 1e-4


def test_grpo_recipe_three_bf16_steps_with_a_server_on_the_same_gpu(tmp_path):
    policy = make_llama_with_tokenizer(str(tmp_path / "policy"), seed=1)
    reference = make_llama_with_tokenizer(str(tmp_path / "reference"), seed=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                               for a in range(3) for b in range(3)))  # fmt: skip
    run_dir = tmp_path / "run"
    config = tmp_path / "grpo.yaml"
    config.write_text(f"""model:
  policy: {policy}
  reference: {reference}
  dtype: bfloat16
algorithm:
  ref_weight: 0.5
  group_size: 4
rollout:
  prompts_per_step: 2
  max_tokens: 8
train:
  micro_batch_size: 4
data:
  train: {prompts}
optim:
  lr: 0.01
run:
  dir: {run_dir}
  steps: 3
  checkpoint_every: 3
  seed: 7
""")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(ROOT / "recipes" / "grpo.py"), "--config", str(config)]  # fmt: skip
    log = tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with log.open("w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=inner_timeout("grpo"))
    assert proc.returncode == 0, log.read_text()[-4000:] + (run_dir / "rollout_server.log").read_text()[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["skipped_steps"] == 0
        # The bf16 trainer's log pi_mix against the float32 server's, on the same weights.
        assert r["mismatch/max_abs"] < 0.25
    print("[smoke] grpo bf16 on one GPU: " + ", ".join(
        f"step {r['step']} mismatch max {r['mismatch/max_abs']:.3f} update {r['time/update_s']:.2f}s" for r in records))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "3"
