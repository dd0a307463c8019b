"""Log pi_mix of two tiny Megatron GPTModels at any tensor-parallel size, checked two ways.

    python recipes/pimix_tp_check.py [--config configs/pimix_check.yaml] [key=value ...]
    torchrun --nproc-per-node 2 recipes/pimix_tp_check.py        (or srun -n 2, launcher/pimix_tp_check.sh)

A policy and a frozen reference (Llama-style, seeded so that their weights do not depend on TP) score the same
random tokens; `mixed_logprobs` computes log pi_mix on the vocabulary shards and backpropagates into the policy.
Rank 0 checks the log-probs and logit gradients against float64 on the gathered vocabulary, saves the result
to out_dir, and compares it with the result of every other TP size already there.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_logitavg.config import load_config
from nemo_logitavg.models import LlamaConfig, build_gpt_model
from nemo_logitavg.ops import mixed_logprobs
from nemo_logitavg.parallel import init_parallel, launch_env, teardown

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pimix_check.yaml"


@dataclass
class ModelSection:
    vocab_size: int = 1000
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False


@dataclass
class CheckConfig:
    model: ModelSection = field(default_factory=ModelSection)
    ref_weight: float = 0.5
    temperature: float = 1.0
    batch_size: int = 4
    seq_length: int = 64
    chunk_size: int = 64
    policy_seed: int = 1234
    reference_seed: int = 4321
    out_dir: str = "outputs/pimix_check"


def gather_vocab(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the YAML config")
    args = parser.parse_args()
    cfg = load_config(CheckConfig, args.config, args.overrides)

    tp = launch_env().world_size  # every process of the launch forms one TP group
    init_parallel(tensor_parallel_size=tp)
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank()
    model_cfg = LlamaConfig(**asdict(cfg.model))

    torch.manual_seed(cfg.policy_seed)
    policy = build_gpt_model(model_cfg, tensor_parallel_size=tp)
    torch.manual_seed(cfg.reference_seed)
    reference = build_gpt_model(model_cfg, tensor_parallel_size=tp).eval().requires_grad_(False)

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.seq_length + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(cfg.seq_length).expand(cfg.batch_size, -1)

    policy_logits = policy(inputs, positions, None)  # [batch, seq, padded_vocab / TP]
    policy_logits.retain_grad()
    with torch.no_grad():
        ref_logits = reference(inputs, positions, None)
    logprobs, entropy = mixed_logprobs(
        policy_logits, ref_logits, targets, cfg.ref_weight, cfg.temperature, tp_group=group,
        chunk_size=cfg.chunk_size, return_entropy=True, true_vocab_size=model_cfg.vocab_size,
    )  # fmt: skip
    logprobs.sum().backward()

    # TP-invariant summaries of the policy gradient: the squared norm over all parameters (sharded ones summed
    # over TP, replicated ones once) and the replicated final-norm gradient.
    sq_sharded = sum(p.grad.double().square().sum() for p in policy.parameters() if _sharded(p))
    sq_replicated = sum(p.grad.double().square().sum() for p in policy.parameters() if not _sharded(p))
    dist.all_reduce(sq_sharded, group=group)
    grad_norm = float((sq_sharded + sq_replicated).sqrt())
    final_norm_grad = policy.decoder.final_layernorm.weight.grad.clone()

    full_pol = gather_vocab(policy_logits.detach(), group)[..., : model_cfg.vocab_size].double()
    full_ref = gather_vocab(ref_logits, group)[..., : model_cfg.vocab_size].double()
    full_grad = gather_vocab(policy_logits.grad, group)
    status = 0
    if rank == 0:
        pol = full_pol.clone().requires_grad_()
        mixed = ((1 - cfg.ref_weight) * pol + cfg.ref_weight * full_ref) / cfg.temperature
        dense = torch.log_softmax(mixed, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        dense.sum().backward()
        lp_err = (logprobs.double() - dense).abs().max().item()
        grad_err = ((full_grad[..., : model_cfg.vocab_size].double() - pol.grad).norm() / pol.grad.norm()).item()
        pad_grad = full_grad[..., model_cfg.vocab_size :].abs().max().item() if full_grad.shape[-1] > 0 else 0.0
        print(f"[pimix_tp_check] TP={tp}: {cfg.batch_size}x{cfg.seq_length} tokens, ref_weight={cfg.ref_weight}")
        print(f"  vs float64 on the gathered vocabulary: log-prob max abs err {lp_err:.2e}, "
              f"logit-grad rel err {grad_err:.2e}, padded-column grad {pad_grad:.1e}")  # fmt: skip
        ok = lp_err < 1e-5 and grad_err < 1e-5 and pad_grad == 0.0
        out_dir = Path(cfg.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result = {
            "logprobs": logprobs.detach(),
            "entropy": entropy,
            "grad_norm": grad_norm,
            "final_norm_grad": final_norm_grad,
            "config": json.dumps(asdict(cfg)),
        }
        torch.save(result, out_dir / f"tp{tp}.pt")
        for other_path in sorted(out_dir.glob("tp*.pt")):
            other = torch.load(other_path)
            if other_path.stem == f"tp{tp}" or other["config"] != result["config"]:
                continue
            d_lp = (other["logprobs"] - result["logprobs"]).abs().max().item()
            d_ent = (other["entropy"] - result["entropy"]).abs().max().item()
            d_norm = abs(other["grad_norm"] - grad_norm) / grad_norm
            d_final = (other["final_norm_grad"] - final_norm_grad).abs().max().item()
            print(f"  vs {other_path.stem.upper()}: log-prob max abs diff {d_lp:.2e}, entropy {d_ent:.2e}, "
                  f"policy grad-norm rel diff {d_norm:.2e}, final-norm grad {d_final:.2e}")  # fmt: skip
            ok = ok and d_lp < 1e-4 and d_ent < 1e-4 and d_norm < 1e-4 and d_final < 1e-4
        print(f"  reference grads: {'none' if all(p.grad is None for p in reference.parameters()) else 'PRESENT'}")
        ok = ok and all(p.grad is None for p in reference.parameters())
        print(f"[pimix_tp_check] {'PASS' if ok else 'FAIL'}")
        status = 0 if ok else 1
    flag = torch.tensor([status])
    dist.broadcast(flag, src=0)
    teardown()
    return int(flag.item())


def _sharded(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


if __name__ == "__main__":
    sys.exit(main())
