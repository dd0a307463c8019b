"""The parallel runtime and the CPU compatibility shim: megatron-core GPTModels on gloo, TP=2 against TP=1."""

from __future__ import annotations

import os

import pytest
import torch

from nemo_logitavg.parallel import launch_env
from tests.distributed import run_distributed


def test_launch_env_from_torchrun():
    env = launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (3, 4, 1, "10.1.2.3", 2)


def test_launch_env_single_process_default():
    env = launch_env({})
    assert (env.rank, env.world_size, env.master_addr) == (0, 1, "127.0.0.1")


def test_launch_env_from_srun():
    env = launch_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "node[03-05],gpu1",
            "SLURM_JOB_ID": "123456",
        }
    )
    assert (env.rank, env.world_size, env.local_rank) == (5, 8, 1)
    assert env.master_addr == "node03"
    assert env.master_port == 20000 + 123456 % 20000


@pytest.mark.parametrize(
    "environ,message",
    [
        ({"RANK": "0"}, "incomplete launcher environment"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "outside the world size"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    ],
)
def test_launch_env_errors(environ, message):
    with pytest.raises(ValueError, match=message):
        launch_env(environ)


def test_init_parallel_refuses_layout_that_does_not_divide_world():
    from nemo_logitavg.parallel import init_parallel

    environ = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1"}
    with pytest.raises(ValueError, match="not a multiple of tensor_parallel_size x pipeline_parallel_size = 2 x 1"):
        init_parallel(tensor_parallel_size=2, environ=environ)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        init_parallel(tensor_parallel_size=0, environ=environ)


def test_rank_device_on_cpu():
    from nemo_logitavg.parallel import default_backend, rank_device

    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1"}
    if torch.cuda.is_available():
        assert rank_device(environ) == torch.device("cuda", 3 % torch.cuda.device_count())
        assert default_backend() == "cpu:gloo,cuda:nccl"
    else:
        assert rank_device(environ) == rank_device({}) == torch.device("cpu")
        assert default_backend() == "gloo"


def _groups_worker(wait_timeout_s: float, rank0_delays_s: tuple[float, ...]) -> dict:
    """The default group takes CPU tensors and objects; ranks wait on the wait group while rank 0 sleeps."""
    import time

    import torch.distributed as dist

    from nemo_logitavg.parallel import init_parallel, rank_device, teardown, wait_group

    init_parallel(wait_timeout_s=wait_timeout_s)
    flag = torch.tensor([float(dist.get_rank())], device="cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a CPU control tensor on the default group
    on_device = torch.ones(1, device=rank_device())
    dist.all_reduce(on_device)
    objects = [{"from": dist.get_rank()}]
    dist.broadcast_object_list(objects, src=0, group=wait_group())
    backend, waits = dist.get_backend(), []
    for delay in rank0_delays_s:
        if dist.get_rank() == 0:
            time.sleep(delay)  # rank 0 "rolls out" while rank 1 waits on the wait group
        started, error = time.monotonic(), None
        try:
            dist.barrier(group=wait_group())
        except RuntimeError as exc:
            error = str(exc)
        waits.append((time.monotonic() - started, error))
        if error is not None:
            break  # a group that timed out cannot be used (or torn down) again; the process exits instead
    else:
        teardown()
    return {"max": flag.item(), "sum": on_device.item(), "object": objects[0], "backend": backend, "waits": waits}


@pytest.mark.slow
def test_default_group_takes_cpu_tensors_and_the_wait_group_has_its_own_timeout():
    from nemo_logitavg.parallel import default_backend

    # A 4 s wait group: rank 0 taking 1 s is waited for; taking 8 s, the waiting rank gives up after 4 s.
    ranks = run_distributed(_groups_worker, world_size=2, wait_timeout_s=4.0, rank0_delays_s=(1.0, 8.0))
    for rank in ranks:
        assert (rank["max"], rank["sum"], rank["object"]) == (1.0, 2.0, {"from": 0})
        assert rank["backend"] == default_backend()
    (first_wait, first_error), (second_wait, second_error) = ranks[1]["waits"]
    assert first_error is None and 0.5 <= first_wait < 4.0
    assert second_error is not None and "Timed out" in second_error and 3.0 <= second_wait < 7.0


def _gpt_worker(ref_weight: float) -> dict:
    """Policy + frozen reference at TP = world size; pi_mix loss through megatron's schedule on CPU."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from nemo_logitavg import cpu_compat
    from nemo_logitavg.models import LlamaConfig, build_gpt_model
    from nemo_logitavg.ops import mixed_logprobs
    from nemo_logitavg.parallel import init_parallel, teardown

    tp = int(os.environ["WORLD_SIZE"])
    init_parallel(tensor_parallel_size=tp, seed=99)
    assert cpu_compat.apply() is True  # idempotent
    group = parallel_state.get_tensor_model_parallel_group()
    cfg = LlamaConfig(
        vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(1)
    policy = build_gpt_model(cfg, tensor_parallel_size=tp)
    torch.manual_seed(2)
    reference = build_gpt_model(cfg, tensor_parallel_size=tp).eval().requires_grad_(False)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    batch = {"input": tokens[:, :-1], "target": tokens[:, 1:], "positions": torch.arange(16).expand(2, -1)}

    def forward_step(data_iterator, model):
        data = next(data_iterator)
        logits = model(data["input"], data["positions"], None)
        with torch.no_grad():
            ref_logits = reference(data["input"], data["positions"], None)
        logprobs = mixed_logprobs(
            logits, ref_logits, data["target"], ref_weight, tp_group=group, true_vocab_size=cfg.vocab_size
        )

        def loss_func(output):
            loss = -output.mean()
            return loss, {"loss": loss.detach().clone()}

        return logprobs, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[policy],
        num_microbatches=1,
        seq_length=16,
        micro_batch_size=2,
        forward_only=False,
    )
    sharded = [p for p in policy.parameters() if getattr(p, "tensor_model_parallel", False)]
    sq = sum(p.grad.double().square().sum() for p in sharded)
    torch.distributed.all_reduce(sq, group=group)
    sq = sq + sum(p.grad.double().square().sum() for p in policy.parameters() if p not in set(sharded))

    # The RNG tracker forks a TP-rank-specific stream on the CPU generator and restores the default one.
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        tp_stream = torch.rand(4)
    restored = torch.equal(before, torch.get_rng_state())
    streams = [torch.empty_like(tp_stream) for _ in range(tp)]
    torch.distributed.all_gather(streams, tp_stream, group=group)

    result = {
        "loss": losses[0]["loss"].item(),
        "grad_norm": sq.sqrt().item(),
        "final_norm_grad": policy.decoder.final_layernorm.weight.grad.clone(),
        "reference_grads": sum(p.grad is not None for p in reference.parameters()),
        "rng_restored": restored,
        "tp_streams_distinct": tp == 1 or not torch.equal(streams[0], streams[1]),
    }
    teardown()
    return result


@pytest.mark.slow
def test_gpt_models_on_cpu_tp2_match_tp1():
    single = run_distributed(_gpt_worker, 1, ref_weight=0.5)[0]
    pair = run_distributed(_gpt_worker, 2, ref_weight=0.5)
    for rank, result in enumerate(pair):
        assert abs(result["loss"] - single["loss"]) < 1e-5, rank
        assert abs(result["grad_norm"] - single["grad_norm"]) / single["grad_norm"] < 1e-5, rank
        torch.testing.assert_close(result["final_norm_grad"], single["final_norm_grad"], atol=1e-6, rtol=1e-5)
        assert result["reference_grads"] == 0
        assert result["rng_restored"] and result["tp_streams_distinct"]
    assert single["reference_grads"] == 0 and single["rng_restored"]
