"""SFT of the policy alone: packing, and a few steps on a tiny Llama lowering the response NLL at TP=2."""

from __future__ import annotations

import pytest
import torch

from nemo_logitavg.trainer.sft import pack_sft
from tests.distributed import run_distributed
from tests.tiny_models import make_hf_llama


def test_pack_sft_masks_the_response():
    batch = pack_sft([{"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}, {"prompt_ids": [7], "response_ids": [8]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [7, 0, 0, 0]]
    assert batch["targets"].tolist() == [[2, 3, 4, 5], [8, 0, 0, 0]]
    assert batch["mask"].tolist() == [[False, False, True, True], [True, False, False, False]]


def _sft_worker(policy_dir: str, out_dir: str) -> dict:
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.models.conversion.streaming import export_model_hf
    from nemo_logitavg.parallel import init_parallel, teardown
    from nemo_logitavg.trainer.sft import train_sft

    init_parallel(tensor_parallel_size=2)
    cfg = LlamaConfig.from_hf(policy_dir)
    actor = LogitAveragingActor(cfg, None, ActorConfig(lr=3e-3))
    actor.load_hf(policy_dir, None)
    gen = torch.Generator().manual_seed(0)
    # A learnable task: the response repeats the prompt.
    records = []
    for _ in range(16):
        prompt = torch.randint(1, cfg.vocab_size, (4,), generator=gen).tolist()
        records.append({"prompt_ids": prompt, "response_ids": prompt})
    losses = train_sft(actor, records, steps=12, sequences_per_step=8, micro_batch_size=4)
    export_model_hf(actor.gpt_policy, cfg, out_dir, source_dir=policy_dir)
    teardown()
    return {"losses": losses}


@pytest.mark.slow
def test_sft_lowers_response_nll_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    policy_dir = make_hf_llama(tmp_path / "base", seed=7)
    out = tmp_path / "sft"
    losses = run_distributed(_sft_worker, 2, policy_dir=policy_dir, out_dir=str(out))[0]["losses"]
    assert losses[-1] < 0.7 * losses[0], losses
    model = AutoModelForCausalLM.from_pretrained(out)  # the exported SFT model loads as a plain HF model
    base = AutoModelForCausalLM.from_pretrained(policy_dir)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters(), strict=True))


@pytest.mark.slow
def test_sft_recipe_end_to_end(tmp_path):
    """recipes/sft.py under torchrun (TP=2) from text jsonl to a Hugging Face directory."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny_models import make_llama_with_tokenizer

    root = Path(__file__).resolve().parent.parent
    base = make_llama_with_tokenizer(str(tmp_path / "base"), seed=3)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": f"\\boxed{{{2 * a}}}"}) + "\n"
                            for a in range(10)))  # fmt: skip
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {base}\ndata: {data}\nout: {tmp_path / 'out'}\ntensor_parallel: 2\n"
                      "steps: 6\nsequences_per_step: 4\nmicro_batch_size: 2\nlr: 0.003\n")  # fmt: skip
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(root / "recipes" / "sft.py"), "--config", str(config)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[sft] step 6/6" in result.stdout
    lines = (tmp_path / "out.metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("1+1=")["input_ids"]
