"""Hugging Face <-> Megatron-Core conversion of tiny random Llama / Llama 3.x / Qwen2 models: logits, exact round
trips, clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from nemo_logitavg.models.builder import MEGATRON_LLAMA3_ROPE, LlamaConfig
from nemo_logitavg.models.conversion.hf_files import export_hf, read_hf_state
from nemo_logitavg.models.conversion.loading import load_mcore_state_dict
from nemo_logitavg.models.conversion.mapping import hf_to_mcore_state_dict, mcore_to_hf_state_dict
from nemo_logitavg.models.conversion.mcore_checkpoint import convert_hf_to_mcore
from tests.distributed import gather_mcore_shards, run_distributed
from tests.memory import PeakRSS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
VOCAB = 100  # pads to 128 (TP=1) and 256 (TP=2)
SEQ = 32
# name -> (family, tied). "llama3": Llama 3.x rope scaling (llama3 type, megatron's constants); "qwen2": q/k/v biases.
MODELS = {
    "llama": ("llama", False),
    "llama_tied": ("llama", True),
    "llama3": ("llama3", False),
    "qwen2": ("qwen2", False),
    "qwen2_tied": ("qwen2", True),
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def make_hf_model(path: Path, family: str, tied: bool, seed: int) -> None:
    """A random float32 model (GQA, 2 layers) with non-trivial norms / biases and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
        tie_word_embeddings=tied,
    )
    if family == "qwen2":
        config = Qwen2Config(
            **shape,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        model = Qwen2ForCausalLM(config)
    else:
        rope = LLAMA3_ROPE if family == "llama3" else {"rope_type": "default", "rope_theta": 500000.0}
        # Llama 3.x scales frequencies against an original context of 8192 (megatron's constant).
        max_positions = 16384 if family == "llama3" else 64
        config = HFLlamaConfig(
            **shape, max_position_embeddings=max_positions, rms_norm_eps=1e-5, rope_parameters=dict(rope)
        )
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.uniform_(-0.5, 0.5)
    model.save_pretrained(path)
    words = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(path)


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    state = read_hf_state(path)
    return {name: state[name] for name in state}


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """The tiny models of MODELS (by name), a batch of token ids, and transformers' logits for it."""
    root = tmp_path_factory.mktemp("hf")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    models = {}
    for seed, (name, (family, tied)) in enumerate(MODELS.items(), start=7):
        path = root / name
        make_hf_model(path, family, tied, seed=seed)
        models[name] = {"dir": path, "logits": hf_logits(path, ids), "state": safetensors_state(path)}
    return ids, models


# ----------------------------------------------------------------------------------------- multi-rank


def _build(cfg: LlamaConfig, tp: int, pp: int):
    """build_gpt_model on this rank's stage."""
    from megatron.core import parallel_state as ps

    from nemo_logitavg.models.builder import build_gpt_model

    return build_gpt_model(
        cfg,
        tp,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        pipeline_parallel_size=pp,
    ).eval()


def _full_logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        local = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab]


def _pipeline_logits(model, ids: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """PP=2, TP=1 forward by hand: stage 0's hidden states are sent to stage 1 (no schedule)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        if ps.is_pipeline_first_stage():
            dist.send(model(ids, positions, None).contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        hidden = torch.empty(ids.shape[1], ids.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        return model(None, positions, None)[..., :vocab]


def _expect_error(fn, exc_type, *fragments) -> str:
    try:
        fn()
    except exc_type as exc:
        missing = [f for f in fragments if f not in str(exc)]
        return f"message lacks {missing}: {exc}" if missing else ""
    return f"no {exc_type.__name__} raised"


def _load_errors(tp: int, dirs: dict, cfgs: dict) -> dict[str, str]:
    """Loading refuses a model built for another config and state dicts with wrong keys or shapes."""
    from nemo_logitavg.models.conversion.loading import load_hf_into_mcore

    errors = {}
    model = _build(cfgs["llama_tied"], tp, 1)
    errors["wrong model"] = _expect_error(
        lambda: load_hf_into_mcore(model, dirs["llama"]), ValueError, "tie_word_embeddings"
    )
    errors["no rope scaling"] = _expect_error(
        lambda: load_hf_into_mcore(_build(cfgs["llama"], tp, 1), dirs["llama3"]), ValueError, "rope_scaling"
    )
    other_factor = dataclasses.replace(cfgs["llama3"], rope_scaling_factor=16.0)
    errors["rope factor"] = _expect_error(
        lambda: load_hf_into_mcore(_build(other_factor, tp, 1), dirs["llama3"]), ValueError, "rotary frequencies"
    )
    errors["no qkv bias"] = _expect_error(
        lambda: load_hf_into_mcore(_build(cfgs["llama"], tp, 1), dirs["qwen2"]), ValueError, "qkv_bias"
    )
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    del state["decoder.layers.1.mlp.linear_fc2.weight"]
    state["decoder.layers.9.mlp.linear_fc2.weight"] = torch.zeros(1)
    errors["strict keys"] = _expect_error(
        lambda: load_mcore_state_dict(model, state),
        ValueError,
        "missing keys: decoder.layers.1.mlp.linear_fc2.weight",
        "unexpected keys: decoder.layers.9.mlp.linear_fc2.weight",
    )
    bad_shape = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    bad_shape["decoder.final_layernorm.weight"] = torch.zeros(3)
    errors["shape"] = _expect_error(
        lambda: load_mcore_state_dict(model, bad_shape), ValueError, "decoder.final_layernorm.weight (3,)"
    )
    return errors


def _worker(dirs: dict, ids: torch.Tensor, hf_logits: dict, ckpts: dict) -> dict:
    """Every multi-rank check in one process group: TP=2, then TP=1 (two data-parallel replicas), then PP=2."""
    import inspect

    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from nemo_logitavg.models.conversion.loading import load_hf_into_mcore
    from nemo_logitavg.models.conversion.mcore_checkpoint import load_mcore_checkpoint
    from nemo_logitavg.parallel import init_parallel, teardown

    out: dict = {"diff": {}, "errors": {}, "shards": {}, "equal": {}}
    defaults = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    out["megatron llama3 constants"] = {name: defaults[name].default for name in MEGATRON_LLAMA3_ROPE}
    cfgs = {name: LlamaConfig.from_hf(dirs[name]) for name in dirs}

    for tp, pp in ((2, 1), (1, 1), (1, 2)):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
        layout = f"tp{tp}pp{pp}"
        for name, cfg in cfgs.items():
            model = _build(cfg, tp, pp)
            load_hf_into_mcore(model, dirs[name])
            if pp == 1:
                logits = _full_logits(model, ids, cfg.vocab_size)
            else:
                logits = _pipeline_logits(model, ids, cfg.vocab_size)
            if logits is not None:
                out["diff"][f"{layout} {name}"] = (logits - hf_logits[name]).abs().max().item()
            if name == "llama3" and pp == 1:
                # The same weights without megatron's rope scaling: the comparison above must be able to fail.
                unscaled = _build(dataclasses.replace(cfg, rope_scaling_factor=None), tp, pp)
                load_mcore_state_dict(unscaled, model.state_dict())
                plain = _full_logits(unscaled, ids, cfg.vocab_size)
                out["diff"][f"{layout} llama3 unscaled"] = (plain - hf_logits[name]).abs().max().item()
            if name == "llama_tied" and pp > 1 and ps.is_pipeline_last_stage():
                out["keys tied last stage"] = sorted(k for k in model.state_dict() if not k.endswith("_extra_state"))
            shards = gather_mcore_shards(model)
            if shards is not None:
                out["shards"][f"{layout} {name}"] = shards
            # A converter checkpoint written at another layout loads (re-sharded) to the same weights.
            direct = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
            fresh = _build(cfg, tp, pp)
            load_mcore_checkpoint(fresh, ckpts[name])
            out["equal"][f"{layout} {name} from ckpt"] = all(
                torch.equal(v, direct[k]) for k, v in fresh.state_dict().items() if not k.endswith("_extra_state")
            )

        if (tp, pp) == (2, 1):
            out["errors"] = _load_errors(tp, dirs, cfgs)
    teardown()
    return out


@pytest.mark.slow
def test_megatron_matches_transformers_and_round_trips(hf_models, tmp_path):
    ids, models = hf_models
    dirs = {name: str(m["dir"]) for name, m in models.items()}
    # Converter checkpoints at layouts some runs do not use (re-sharded on load there): the untied ones at
    # TP=2 x PP=2, the tied ones at PP=2 (loaded directly there, re-sharded at TP=2 and TP=1).
    ckpts = {}
    for name in models:
        tp, pp = (1, 2) if MODELS[name][1] else (2, 2)
        ckpts[name] = str(tmp_path / f"ckpt_{name}")
        convert_hf_to_mcore(dirs[name], ckpts[name], tp, pp)
    results = run_distributed(
        _worker, 2, dirs=dirs, ids=ids, hf_logits={name: m["logits"] for name, m in models.items()}, ckpts=ckpts
    )
    assert results[0]["megatron llama3 constants"] == MEGATRON_LLAMA3_ROPE
    diffs = {f"rank{r} {k}": v for r, res in enumerate(results) for k, v in res["diff"].items()}
    unscaled = {k: diffs.pop(k) for k in list(diffs) if k.endswith("unscaled")}
    print("max |logits - transformers|:", json.dumps(diffs, indent=1), "\nwithout rope scaling:", unscaled)
    assert len(diffs) == len(models) * (2 * 2 + 1)  # TP=2 and TP=1 on both ranks, PP=2 on the last stage
    assert max(diffs.values()) < 1e-4, diffs
    assert len(unscaled) == 4 and min(unscaled.values()) > 1e-2, unscaled  # the rope-scaling check is sensitive
    for res in results:
        assert len(res["equal"]) == 3 * len(models) and all(res["equal"].values()), res["equal"]
        assert not any(res["errors"].values()), res["errors"]
    keys = results[1]["keys tied last stage"]
    assert "output_layer.weight" in keys and "embedding.word_embeddings.weight" not in keys
    assert keys[0] == "decoder.final_layernorm.weight" and "decoder.layers.1.mlp.linear_fc2.weight" not in keys

    shards = results[0]["shards"]
    assert sorted(shards) == sorted(f"{layout} {n}" for layout in ("tp2pp1", "tp1pp1", "tp1pp2") for n in models)
    for key, grid in shards.items():
        name = key.split()[1]
        cfg = LlamaConfig.from_hf(dirs[name])
        hf_state = mcore_to_hf_state_dict(grid, cfg)
        assert_same_state(hf_state, models[name]["state"])
        # The shard of every rank equals the pure mapping's.
        tp_size, pp_size = len(grid[0]), len(grid)
        for pp, stage in enumerate(grid):
            for tp, shard in enumerate(stage):
                expected = hf_to_mcore_state_dict(models[name]["state"], cfg, tp, tp_size, pp, pp_size)
                assert_same_state(shard, expected)
    assert shards["tp2pp1 qwen2"][0][1]["decoder.layers.0.self_attention.linear_qkv.bias"].shape == (64,)

    # Export the TP=2 gather and load it with transformers: same weights, same logits, tokenizer kept.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in models:
        out_dir = tmp_path / f"export_{name}"
        cfg = LlamaConfig.from_hf(dirs[name])
        export_hf(mcore_to_hf_state_dict(shards[f"tp2pp1 {name}"], cfg), out_dir, cfg, source_dir=dirs[name])
        assert_same_state(safetensors_state(out_dir), models[name]["state"])
        assert torch.equal(hf_logits(out_dir, ids), models[name]["logits"])
        assert (out_dir / "tokenizer.json").read_bytes() == (models[name]["dir"] / "tokenizer.json").read_bytes()
        if name.startswith("llama"):  # (transformers maps model_type qwen2 to its own Qwen2Tokenizer class)
            assert AutoTokenizer.from_pretrained(out_dir)("w5 w7")["input_ids"] == [5, 7]
    qwen = AutoModelForCausalLM.from_pretrained(tmp_path / "export_qwen2_tied")
    assert type(qwen).__name__ == "Qwen2ForCausalLM"


# ------------------------------------------------------------------------------------ streaming export

# (tensor, pipeline) layouts on 4 ranks and the models each streams; DP fills the rest. TP=2 x PP=2 without DP,
# TP=1 x PP=1 at DP=4 and PP=2 (tied) at DP=2: every replica streams on its own, in its own TP group.
STREAM_LAYOUTS = ((2, 2, ("llama", "qwen2", "llama_tied")), (1, 1, ("llama_tied",)), (1, 2, ("llama_tied",)))
STREAM_BUCKET = 20_000  # bytes: several tensors share a bucket; the embedding and gate/up/down (32 KB) exceed it


def _stream_worker(dirs: dict, hf_states: dict) -> list[dict]:
    """Stream every layout's models; compare each yielded tensor with the source HF weights and with the offline
    mapping of the plainly gathered shards."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_logitavg.models.conversion.loading import load_hf_into_mcore
    from nemo_logitavg.models.conversion.streaming import iter_hf_buckets
    from nemo_logitavg.parallel import init_parallel, teardown

    records = []
    for tp, pp, names in STREAM_LAYOUTS:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_parallel(tensor_parallel_size=tp, pipeline_parallel_size=pp)
        for name in names:
            cfg = LlamaConfig.from_hf(dirs[name])
            model = _build(cfg, tp, pp)
            load_hf_into_mcore(model, dirs[name])
            with torch.no_grad():  # training moves the padding rows too: the export must drop them
                for key, param in model.named_parameters():
                    if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                        start = cfg.vocab_size - param.shape[0] * ps.get_tensor_model_parallel_rank()
                        param[max(0, start) :].fill_(7.0)
            old = mcore_to_hf_state_dict(gather_mcore_shards(model, dst=None), cfg)
            buckets = list(iter_hf_buckets(model, cfg, STREAM_BUCKET))
            yielded = [[(n, tuple(t.shape), t.dtype) for n, t in bucket] for bucket in buckets]
            tensors = [(n, t) for bucket in buckets for n, t in bucket]
            # Gathered to TP rank 0 only (the push's sender, the export's writer): the same buckets there, an
            # empty list per bucket on the other TP ranks.
            to_first = list(iter_hf_buckets(model, cfg, STREAM_BUCKET, dst=0))
            if ps.get_tensor_model_parallel_rank() == 0:
                same_to_first = [[n for n, _ in b] for b in to_first] == [[n for n, _ in b] for b in buckets] and all(
                    torch.equal(t, u) for b, c in zip(to_first, buckets, strict=True)
                    for (_, t), (_, u) in zip(b, c, strict=True)
                )  # fmt: skip
            else:
                same_to_first = to_first == [[] for _ in buckets]
            records.append(
                {
                    "layout": (tp, pp),
                    "model": name,
                    "rank": dist.get_rank(),
                    "tp": ps.get_tensor_model_parallel_rank(),
                    "pp": ps.get_pipeline_model_parallel_rank(),
                    "dp": ps.get_data_parallel_rank(),
                    "yielded": yielded,
                    "same as source": [n for n, t in tensors if not torch.equal(t, hf_states[name][n])],
                    "same as old": [n for n, t in tensors if not torch.equal(t, old[n])],
                    "same to TP rank 0": same_to_first,
                    "fresh": all(
                        t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
                        for _, t in tensors
                        for p in model.parameters()
                    ),
                }
            )
    teardown()
    return records


@pytest.mark.slow
def test_streamed_buckets_match_the_plan_and_the_gathered_export(hf_models):
    from nemo_logitavg.models.conversion.mapping import hf_bucket_plan, hf_shapes, stage_hf_names

    _, models = hf_models
    dirs = {name: str(m["dir"]) for name, m in models.items()}
    ranks = run_distributed(_stream_worker, 4, dirs=dirs, hf_states={n: m["state"] for n, m in models.items()})
    records = [record for rank in ranks for record in rank]
    assert len(records) == 4 * sum(len(names) for _, _, names in STREAM_LAYOUTS)
    for (tp, pp, names) in STREAM_LAYOUTS:
        for name in names:
            cfg = LlamaConfig.from_hf(dirs[name])
            mine = [r for r in records if r["layout"] == (tp, pp) and r["model"] == name]
            streamed: list[str] = []
            for r in mine:
                where = f"{name} at TP={tp} PP={pp}, rank {r['rank']}"
                assert not r["same as source"] and not r["same as old"], (where, r)
                assert r["fresh"], where
                assert r["same to TP rank 0"], where
                plan = hf_bucket_plan(cfg, r["pp"], pp, STREAM_BUCKET, torch.float32)
                assert [[(n, s) for n, s, _ in b] for b in r["yielded"]] == plan, where
                assert [n for b in r["yielded"] for n, _, _ in b] == stage_hf_names(cfg, r["pp"], pp), where
                assert all(d == torch.float32 for b in r["yielded"] for _, _, d in b)
                for bucket in r["yielded"]:
                    size = sum(4 * math.prod(s) for _, s, _ in bucket)
                    assert size <= STREAM_BUCKET or len(bucket) == 1, (where, bucket)
                assert len(r["yielded"]) > 1, where
                if r["tp"] == 0 and r["dp"] == 0:
                    streamed += [n for b in r["yielded"] for n, _, _ in b]
            assert sorted(streamed) == sorted(hf_shapes(cfg)), (name, tp, pp)  # every tensor exactly once


# A model 17x the bucket: 136 MiB of float32 over 4 ranks; the largest tensor (the embedding) is the bucket size.
MEMORY_CFG = dict(
    vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=4,
)  # fmt: skip
MEMORY_BUCKET = 8 * 2**20


def _peak_growth(fn) -> tuple[int, object]:
    """Bytes the resident set grew to at its peak while ``fn`` ran (the kernel's high-water mark, reset first)."""
    with PeakRSS() as rss:
        result = fn()
    return rss.growth, result


def _export_worker(dirs: dict, root: str) -> dict:
    """TP=2 x PP=2: the streaming iterator's memory (and the old gather's, which the bound must catch), exports of
    tiny models (bit-identity checked by the test against the plain gather returned here), an export refused;
    then TP=1 (DP=4) exports of the same weights."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_logitavg.models.conversion.loading import load_hf_into_mcore
    from nemo_logitavg.models.conversion.streaming import export_model_hf, iter_hf_buckets
    from nemo_logitavg.parallel import init_parallel, teardown

    init_parallel(tensor_parallel_size=2, pipeline_parallel_size=2)
    out: dict = {"rank": dist.get_rank()}
    cfg = LlamaConfig(**MEMORY_CFG)
    model = _build(cfg, 2, 2)

    def stream() -> int:
        count = 0
        for bucket in iter_hf_buckets(model, cfg, MEMORY_BUCKET):
            count += len(bucket)
            del bucket
        return count

    out["stream growth"], out["streamed"] = _peak_growth(stream)
    out["gather growth"], _ = _peak_growth(lambda: gather_mcore_shards(model) and None)
    del model

    exports = {}
    for name in ("llama", "qwen2_tied"):
        cfg = LlamaConfig.from_hf(dirs[name])
        model = _build(cfg, 2, 2)
        load_hf_into_mcore(model, dirs[name])
        with torch.no_grad():  # a trained model is no copy of its source (padding rows included)
            for param in model.parameters():
                param.mul_(1.5)
        grid = gather_mcore_shards(model)
        exports[name] = mcore_to_hf_state_dict(grid, cfg) if grid is not None else None
        target = f"{root}/tp2pp2_{name}"
        if name == "llama":  # exported in small files, then again into the same place in one file a stage
            export_model_hf(model, cfg, target, dirs[name], bucket_bytes=20_000, max_shard_bytes=60_000)
            export_model_hf(model, cfg, target, dirs[name], bucket_bytes=20_000)
        else:
            export_model_hf(model, cfg, target, dirs[name])
            export_model_hf(model, cfg, target + "_small", dirs[name], bucket_bytes=20_000, max_shard_bytes=60_000)
    out["exports"] = exports
    try:
        export_model_hf(model, cfg, f"{root}/refused", dirs["llama"])  # the source describes another model
        out["refused"] = "no error"
    except Exception as exc:  # noqa: BLE001
        out["refused"] = f"{type(exc).__name__}: {exc}"

    ps.destroy_model_parallel()
    init_parallel(tensor_parallel_size=1, pipeline_parallel_size=1)
    for name in ("llama", "qwen2_tied"):
        cfg = LlamaConfig.from_hf(dirs[name])
        model = _build(cfg, 1, 1)
        load_hf_into_mcore(model, dirs[name])
        with torch.no_grad():
            for param in model.parameters():
                param.mul_(1.5)
        export_model_hf(model, cfg, f"{root}/tp1_{name}", dirs[name])
    teardown()
    return out


@pytest.mark.slow
def test_streaming_export_memory_files_and_transformers(hf_models, tmp_path, monkeypatch):
    """At TP=2 x PP=2 no rank's RSS grows beyond 2 x max(bucket, largest tensor) while streaming the whole model
    (the old gather to rank 0 does); each stage writes its own files with one index, bit-identical to the plain
    gather's mapping, loading in transformers with the logits of a TP=1 export."""
    from transformers import AutoModelForCausalLM

    from nemo_logitavg.models.conversion.mapping import hf_shapes

    ids, models = hf_models
    dirs = {name: str(m["dir"]) for name, m in models.items()}
    # glibc raises its mmap threshold after each large free, so later blocks come from the heap and stay resident
    # once freed: RSS would then count the allocator's slack (it settles near one bucket more). A fixed threshold
    # returns every freed block, so the resident set tracks what the process holds (the measure of docs/design.md §7).
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(2**20))
    ranks = run_distributed(_export_worker, 4, dirs=dirs, root=str(tmp_path))

    cfg = LlamaConfig(**MEMORY_CFG)
    sizes = [4 * math.prod(shape) for shape in hf_shapes(cfg).values()]
    assert sum(sizes) >= 8 * MEMORY_BUCKET and max(sizes) == MEMORY_BUCKET
    bound = 2 * max(MEMORY_BUCKET, max(sizes))
    growth = {r["rank"]: r["stream growth"] for r in ranks}
    print("RSS growth while streaming (MiB):", {k: round(v / 2**20, 1) for k, v in growth.items()},
          "bound", bound / 2**20, "old gather on rank 0:", round(ranks[0]["gather growth"] / 2**20, 1))  # fmt: skip
    assert all(g <= bound for g in growth.values()), growth
    assert ranks[0]["gather growth"] > 2 * bound  # the measurement sees a whole model landing on one rank
    assert sum(r["streamed"] for r in ranks if r["rank"] in (0, 2)) == len(sizes)  # TP rank 0 of each stage

    for r in ranks:
        assert r["refused"].startswith("ValueError: " if r["rank"] == 0 else "RuntimeError: "), r["refused"]
        assert "describes another model" in r["refused"]
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{layout}_{name}" for layout in ("tp2pp2", "tp1") for name in ("llama", "qwen2_tied")
    ) + ["tp2pp2_qwen2_tied_small"]

    for name in ("llama", "qwen2_tied"):
        gathered = ranks[0]["exports"][name]
        cfg = LlamaConfig.from_hf(dirs[name])
        for folder in (f"tp2pp2_{name}", f"tp1_{name}") + ((f"tp2pp2_{name}_small",) if "tied" in name else ()):
            path = tmp_path / folder
            assert_same_state(safetensors_state(path), gathered)
            assert (path / "tokenizer.json").read_bytes() == (models[name]["dir"] / "tokenizer.json").read_bytes()
            assert LlamaConfig.from_hf(path) == cfg
            weights = sorted(p.name for p in path.glob("*.safetensors"))
            if folder.startswith("tp1"):
                assert weights == ["model.safetensors"] and not (path / "model.safetensors.index.json").exists()
                continue
            index = json.loads((path / "model.safetensors.index.json").read_text())
            assert sorted(index["weight_map"]) == sorted(hf_shapes(cfg))
            assert sorted(set(index["weight_map"].values())) == weights
            assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in gathered.values())
            stages = {}  # each file holds one stage's tensors
            for tensor, file in index["weight_map"].items():
                stage = 0 if tensor == "model.embed_tokens.weight" or ".layers.0." in tensor else 1
                assert stages.setdefault(file, stage) == stage, (file, tensor)
            many = folder.endswith("_small")
            assert (len(weights) > 4) == many and len(weights) >= 2, weights
        tp1 = hf_logits(tmp_path / f"tp1_{name}", ids)
        assert torch.equal(hf_logits(tmp_path / f"tp2pp2_{name}", ids), tp1)
        assert (tp1 - models[name]["logits"]).abs().max() > 1e-3  # the scaled weights, not the source's
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "tp2pp2_qwen2_tied")).__name__ == "Qwen2ForCausalLM"


def test_stage_names_and_bucket_plan():
    from nemo_logitavg.models.conversion.mapping import hf_bucket_plan, hf_shapes, stage_hf_names

    for tied in (False, True):
        cfg = LlamaConfig(
            vocab_size=10, hidden_size=8, intermediate_size=4, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tied,
        )  # fmt: skip
        shapes = hf_shapes(cfg)
        assert stage_hf_names(cfg, 0, 1) == list(shapes)
        stages = [stage_hf_names(cfg, r, 4) for r in range(4)]
        assert sum(stages, []) == list(shapes)  # every name once, in order
        assert stages[0][0] == "model.embed_tokens.weight" and stages[1][0] == "model.layers.1.input_layernorm.weight"
        assert all(n.startswith("model.layers.2.") for n in stages[2])
        assert stages[3][-1] == ("model.norm.weight" if tied else "lm_head.weight")
        assert ("lm_head.weight" in sum(stages, [])) is not tied

        assert hf_bucket_plan(cfg, 1, 2, 2**30, torch.float32) == [[(n, shapes[n]) for n in stage_hf_names(cfg, 1, 2)]]
        singles = hf_bucket_plan(cfg, 0, 1, 1, torch.bfloat16)
        assert singles == [[(n, shapes[n])] for n in shapes]
        # 8x8 projections are 256 bytes in float32, 128 in bfloat16; norms 32 / 16.
        plan = hf_bucket_plan(cfg, 1, 4, 300, torch.float32)
        sizes = [sum(4 * math.prod(s) for _, s in bucket) for bucket in plan]
        assert [n for bucket in plan for n, _ in bucket] == stages[1]
        assert all(size <= 300 for size in sizes)
        firsts = [4 * math.prod(bucket[0][1]) for bucket in plan[1:]]
        assert all(size + first > 300 for size, first in zip(sizes, firsts, strict=False))  # greedy: none fits
        assert len(hf_bucket_plan(cfg, 1, 4, 300, torch.bfloat16)) < len(plan)  # the dtype sets the bytes
        assert hf_bucket_plan(cfg, 0, 1, 100, torch.float32)[0] == [("model.embed_tokens.weight", (10, 8))]
    with pytest.raises(ValueError, match="pipeline rank 2 is outside pipeline_parallel_size=2"):
        stage_hf_names(cfg, 2, 2)
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 does not divide num_hidden_layers=4"):
        stage_hf_names(cfg, 0, 3)
    with pytest.raises(ValueError, match="bucket_bytes must be >= 1"):
        hf_bucket_plan(cfg, 0, 1, 0, torch.float32)


# ------------------------------------------------------------------------------------- single process


def run_recipe(name: str, *args: str) -> None:
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        runpy.run_path(str(RECIPES / name), run_name="__main__")
    finally:
        sys.argv = argv


@pytest.mark.parametrize(
    "name,tp,pp", [("llama", 2, 2), ("llama_tied", 1, 2), ("llama_tied", 2, 1), ("llama3", 2, 1), ("qwen2_tied", 2, 2)]
)
def test_recipes_round_trip_exactly(hf_models, tmp_path, name, tp, pp):
    _, models = hf_models
    source = models[name]["dir"]
    run_recipe(
        "convert_hf_to_mcore.py", "--hf", str(source), "--out", str(tmp_path / "ckpt"), "--tp", str(tp), "--pp", str(pp)
    )
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert (meta["tensor_parallel_size"], meta["pipeline_parallel_size"]) == (tp, pp)
    shard = torch.load(tmp_path / "ckpt" / f"mp_rank_{tp - 1:02d}_{pp - 1:03d}" / "model.pt", weights_only=True)
    assert shard["decoder.final_layernorm.weight"].shape == (64,)
    assert shard["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 16 // tp, 64)
    if name.startswith("qwen2"):
        assert shard["decoder.layers.0.self_attention.linear_qkv.bias"].shape == ((4 + 2 * 2) * 16 // tp,)
    else:
        assert "decoder.layers.0.self_attention.linear_qkv.bias" not in shard
    run_recipe("convert_mcore_to_hf.py", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"))
    assert_same_state(safetensors_state(tmp_path / "hf"), models[name]["state"])
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (source / name).read_bytes()
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == json.loads((source / "config.json").read_text())


def test_qkv_layout_is_per_query_group():
    """linear_qkv rows (and Qwen2's biases): per KV group its query heads, key head, value head; TP splits groups."""
    cfg = LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        qkv_bias=True,
    )
    d = 2
    hf = {name: torch.zeros(shape) for name, shape in _hf_shapes(cfg).items()}
    # Row r of each projection holds its own tag, so the layout can be read off the result.
    hf["model.layers.0.self_attn.q_proj.weight"] = torch.arange(8.0)[:, None].expand(8, 8) + 100
    hf["model.layers.0.self_attn.k_proj.weight"] = torch.arange(4.0)[:, None].expand(4, 8) + 200
    hf["model.layers.0.self_attn.v_proj.weight"] = torch.arange(4.0)[:, None].expand(4, 8) + 300
    for proj, rows, tag in (("q", 8, 100), ("k", 4, 200), ("v", 4, 300)):
        hf[f"model.layers.0.self_attn.{proj}_proj.bias"] = torch.arange(float(rows)) + tag + 0.5
    hf["model.layers.0.mlp.gate_proj.weight"] = torch.arange(4.0)[:, None].expand(4, 8) + 400
    hf["model.layers.0.mlp.up_proj.weight"] = torch.arange(4.0)[:, None].expand(4, 8) + 500
    q = [100 + h * d + i for h in range(4) for i in range(d)]
    k = [200 + g * d + i for g in range(2) for i in range(d)]
    v = [300 + g * d + i for g in range(2) for i in range(d)]
    group0 = q[:4] + k[:2] + v[:2]
    group1 = q[4:] + k[2:] + v[2:]
    full = hf_to_mcore_state_dict(hf, cfg)
    assert full["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist() == group0 + group1
    bias = full["decoder.layers.0.self_attention.linear_qkv.bias"]
    assert (bias - 0.5).tolist() == group0 + group1  # each bias entry sits with its weight row
    assert full["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == [400, 401, 402, 403, 500, 501, 502, 503]
    for rank, group in enumerate((group0, group1)):
        shard = hf_to_mcore_state_dict(hf, cfg, tp_rank=rank, tp_size=2)
        assert shard["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist() == group
        assert (shard["decoder.layers.0.self_attention.linear_qkv.bias"] - 0.5).tolist() == group
        fc1 = [400 + 2 * rank, 401 + 2 * rank, 500 + 2 * rank, 501 + 2 * rank]  # [gate_r; up_r]
        assert shard["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == fc1
        assert shard["embedding.word_embeddings.weight"].shape == (128, 8)  # 10 padded to 256, split in 2
    merged = mcore_to_hf_state_dict([[hf_to_mcore_state_dict(hf, cfg, r, 2) for r in range(2)]], cfg)
    assert_same_state(merged, hf)


def _hf_shapes(cfg):
    from nemo_logitavg.models.conversion.mapping import hf_shapes

    return hf_shapes(cfg)


def test_transformer_engine_names_are_translated():
    """With TE's spec the layer norms live in linear_qkv / linear_fc1; loading and merging translate the names."""
    from nemo_logitavg.models.conversion.mapping import local_names

    te_names = {
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": torch.ones(4),
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": torch.full((4,), 2.0),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(2, 4),
        "decoder.layers.0.mlp.linear_fc1._extra_state": None,
    }
    local = local_names(te_names)
    assert sorted(local) == [
        "decoder.layers.0.input_layernorm.weight",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.pre_mlp_layernorm.weight",
    ]
    model = torch.nn.Module()
    holder = torch.nn.ParameterDict({"layer_norm_weight": torch.nn.Parameter(torch.zeros(4))})
    model.add_module("decoder", torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Module()])}))
    model.decoder.layers[0].add_module("self_attention", torch.nn.ModuleDict({"linear_qkv": holder}))
    load_mcore_state_dict(model, {"decoder.layers.0.input_layernorm.weight": torch.ones(4)})
    assert torch.equal(holder["layer_norm_weight"], torch.ones(4))


@pytest.mark.parametrize("name", ["llama_tied", "llama3", "qwen2_tied"])
def test_sharded_safetensors_export_and_read(hf_models, tmp_path, name):
    ids, models = hf_models
    state = models[name]["state"]
    cfg = LlamaConfig.from_hf(models[name]["dir"])
    export_hf(state, tmp_path, cfg, max_shard_bytes=60_000)  # no source dir: config written from cfg
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    assert_same_state(safetensors_state(tmp_path), state)
    assert LlamaConfig.from_hf(tmp_path) == cfg
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    source_config = json.loads((models[name]["dir"] / "config.json").read_text())
    assert type(loaded).__name__ == source_config["architectures"][0]
    assert torch.equal(hf_logits(tmp_path, ids), models[name]["logits"])  # rope scaling and biases written back
    if cfg.tie_word_embeddings:
        assert torch.equal(loaded.lm_head.weight, state["model.embed_tokens.weight"])


# ------------------------------------------------------------------------------------------- errors


def write_config(path: Path, **changes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 500000.0,
    }
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architecture GPT2LMHeadModel"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "llama"}, "do not match model_type 'llama'"),
        ({"architectures": None, "model_type": "mistral"}, "model_type 'mistral'"),
        ({"attention_bias": True}, "attention_bias.*o_proj"),  # Llama's covers o_proj too: not megatron's qkv bias
        ({"mlp_bias": True}, "mlp_bias"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True}, "sliding"),
        (
            {"model_type": "qwen2", "architectures": None, "layer_types": ["full_attention", "sliding_attention"]},
            "sliding_attention",
        ),  # fmt: skip
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling without low_freq_factor"),
        (
            {"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096}},
            r"original_max_position_embeddings=4096 \(megatron uses 8192\).*rotary_pos_embedding.py",
        ),
        ({"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0}}, "low_freq_factor=2.0"),
        ({"rope_parameters": {**LLAMA3_ROPE, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, changes, message):
    path = write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message) as info:
        LlamaConfig.from_hf(path)
    assert str(path / "config.json") in str(info.value)


def test_config_layouts_of_transformers_4_and_5(tmp_path):
    old = LlamaConfig.from_hf(write_config(tmp_path / "v4", rope_theta=500000.0, tie_word_embeddings=True))
    new_dict = json.loads((write_config(tmp_path / "v5")).joinpath("config.json").read_text())
    new_dict.pop("rope_theta")
    new_dict.update(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=True)
    assert LlamaConfig.from_hf(new_dict) == old
    assert old.rope_theta == 500000.0 and old.rms_norm_eps == 1e-6 and old.tie_word_embeddings
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_hf(tmp_path / "nowhere")

    # Llama 3.x rope scaling: rope_scaling with "rope_type" or the older "type", or rope_parameters.
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    v4 = LlamaConfig.from_hf(write_config(tmp_path / "l3v4", rope_scaling=scaling))
    legacy = {**{k: v for k, v in scaling.items() if k != "rope_type"}, "type": "llama3"}
    assert LlamaConfig.from_hf(write_config(tmp_path / "l3legacy", rope_scaling=legacy)) == v4
    v5 = {**new_dict, "rope_parameters": dict(LLAMA3_ROPE), "tie_word_embeddings": False}
    assert LlamaConfig.from_hf(v5) == v4
    assert (v4.rope_scaling_factor, v4.rope_theta, v4.qkv_bias) == (8.0, 500000.0, False)
    assert (v4.rope_low_freq_factor, v4.rope_high_freq_factor, v4.rope_original_max_position_embeddings) == (1, 4, 8192)
    with pytest.raises(ValueError, match="high_freq_factor=2.0"):
        dataclasses.replace(v4, rope_high_freq_factor=2.0)  # a hand-made config is checked too

    # Qwen2: q/k/v biases; its own rms_norm_eps / rope_theta (transformers 4 and 5 layouts).
    qwen = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1e6}
    q4 = LlamaConfig.from_hf(write_config(tmp_path / "q4", use_sliding_window=False, sliding_window=4096, **qwen))
    assert q4.qkv_bias and q4.model_type == "qwen2" and q4.rope_scaling_factor is None
    assert (q4.rms_norm_eps, q4.rope_theta) == (1e-6, 1e6)
    q5 = {**new_dict, **qwen, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    q5.update(tie_word_embeddings=False, layer_types=["full_attention"] * 2, attention_bias=True)  # ignored by Qwen2
    q5.pop("rope_theta")
    assert LlamaConfig.from_hf(q5) == q4


@pytest.mark.parametrize(
    "tp,pp,message", [(3, 1, "num_attention_heads=4"), (4, 1, "num_key_value_heads=2"), (2, 3, "num_hidden_layers=2")]
)
def test_parallel_sizes_that_do_not_divide(hf_models, tmp_path, tp, pp, message):
    _, models = hf_models
    with pytest.raises(ValueError, match=message):
        convert_hf_to_mcore(models["llama"]["dir"], tmp_path, tp, pp)
    assert not (tmp_path / "meta.json").exists()


def test_missing_weights_and_keys(hf_models, tmp_path):
    from safetensors.torch import save_file

    _, models = hf_models
    state = dict(models["llama"]["state"])
    empty = write_config(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert_hf_to_mcore(empty, tmp_path / "out")

    index_dir = write_config(tmp_path / "index")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in state}
    (index_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        read_hf_state(index_dir)

    broken = write_config(tmp_path / "broken")
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(
        ValueError,
        match="missing keys: model.layers.1.mlp.up_proj.weight.*unexpected keys: model.layers.7.mlp.up_proj.weight",
    ):
        convert_hf_to_mcore(broken, tmp_path / "out")

    cfg = LlamaConfig.from_hf(models["llama"]["dir"])
    shards = [[hf_to_mcore_state_dict(models["llama"]["state"], cfg, tp, 2) for tp in range(2)]]
    del shards[0][1]["decoder.layers.0.mlp.linear_fc2.weight"]
    with pytest.raises(ValueError, match=r"\(pp=0, tp=\[1\]\) has no key decoder.layers.0.mlp.linear_fc2.weight"):
        mcore_to_hf_state_dict(shards, cfg)
    shards[0][1]["decoder.layers.0.mlp.linear_fc2.weight"] = shards[0][0]["decoder.layers.0.mlp.linear_fc2.weight"]
    shards[0][0]["decoder.layers.0.self_attention.linear_qkv.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="does not know: .*linear_qkv.bias"):
        mcore_to_hf_state_dict(shards, cfg)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        run_recipe("convert_mcore_to_hf.py", "--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "x"))
