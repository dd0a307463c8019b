"""Capacity planner: memory per GPU of a logit-averaging GRPO layout, with the arithmetic shown.

Pure arithmetic on the model's shape (nothing is built, no GPU is needed). Two kinds of GPU are planned separately:

- **training GPU** (Megatron, TP x PP x DP): the policy's bf16 weights, its fp32 gradient buffer
  (``grad_reduce_in_fp32=True``), the distributed optimiser's fp32 master weights and Adam moments
  (12 bytes per parameter, sharded over DP), the frozen reference's bf16 weights (same sharding, no grad, no
  optimiser), activations, and the chunked pi_mix log-prob buffers. Every pipeline stage is computed and the
  worst one is reported: the first stage holds the embedding and the most in-flight micro-batches, the last
  the output layer and the logits.
- **rollout GPU** (one inference server over ``rollout TP`` GPUs): both stacks' bf16 weights, both stacks' KV
  caches for the maximum concurrent sequences at the maximum context, and the engine's workspace. The
  planner's available memory is what vLLM is given: the launcher passes it as ``gpu_memory_gib``, which the
  vLLM engine turns into vLLM's ``gpu_memory_utilization`` against the memory CUDA reports (vLLM's default of
  0.9 would give an H100 80GB, which reports 79.6 GiB, 71.6 GiB instead). Inside that budget vLLM puts the
  weights, its profile run's peak activations and non-torch allocations (the workspace line) and makes the
  rest KV cache, so a plan that fits gets at least the planned KV cache (with ``max_num_batched_tokens`` and
  ``max_num_seqs`` as planned, which the launcher also passes).

Activation estimate (bytes a token, a layer, one micro-batch), after Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), whose GPT layer stores
``s*b*h*(34 + 5*a*s/h)`` bytes. Adapted to a Llama block as megatron-core runs it here: no dropout (no masks),
fused/flash attention (no ``a*s*s`` softmax term; a float32 log-sum-exp per head instead), grouped-query K/V
(``kv_heads * head_dim`` wide), SwiGLU (the fc1 output is ``2*I`` wide, the fc2 input ``I``):

    replicated over TP without sequence parallel:  2 (attn norm in) + 2 (qkv in) + 2 (mlp norm in) + 2 (fc1 in)
                                                     = 8h
    split over TP:  2h (q) + 4*kv*d (k, v) + 2h (o_proj in) + 4a (softmax lse) + 4I (fc1 out) + 2I (fc2 in)
                                                     = 4h + 4*kv*d + 6I + 4a

With sequence parallel the replicated part is split over TP too. For GPT shapes (kv*d = h, GeLU MLP of 4h)
this gives ``8h + 24h/t``, Korthikanti's ``10h + 24h/t`` without the two dropout masks. With full activation
recomputation (uniform, one layer per checkpoint) a layer keeps only its input, ``2h`` a token, and the
backward rebuilds one layer at a time, so one layer's full activations are added once. Under 1F1B pipeline
stage ``i`` (of ``PP``) holds ``PP - i`` micro-batches in flight (the first stage ``PP``), assuming at least
``PP`` micro-batches a step.

The figures are estimates for planning, not measurements: the reserve (default 6 GiB) stands for what lies
outside the planned lines: the CUDA context, NCCL buffers, allocator fragmentation, vLLM's CUDA graphs (outside
its ``gpu_memory_utilization`` budget) and the memory a GPU does not show (an H100 80GB reports 79.6 GiB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from nemo_logitavg.config import GRPOConfig
from nemo_logitavg.models.builder import LlamaConfig, padded_vocab_size
from nemo_logitavg.ops.mixed_logprobs import DEFAULT_CHUNK_ELEMENTS  # the op's own default, budgeted as it runs

GIB = 1 << 30
VLLM_BATCHED_TOKENS = 8192  # vLLM's max_num_batched_tokens, planned here and passed to it by the launcher


# ------------------------------------------------------------------------------------------------ presets


def llama3_8b() -> LlamaConfig:
    """Llama-3.1-8B's shape (128k vocabulary, untied embeddings)."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling_factor=8.0,
    )


def llama3_70b() -> LlamaConfig:
    """Llama-3.3-70B's shape (128k vocabulary, untied embeddings)."""
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling_factor=8.0,
    )


MODEL_PRESETS: dict[str, Callable[[], LlamaConfig]] = {"llama3-8b": llama3_8b, "llama3-70b": llama3_70b}


def resolve_model(name_or_dir: str) -> LlamaConfig:
    """A preset by name (``llama3-8b``, ``llama3-70b``) or the config of a Hugging Face directory."""
    if name_or_dir in MODEL_PRESETS:
        return MODEL_PRESETS[name_or_dir]()
    return LlamaConfig.from_hf(name_or_dir)


# ------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class TrainingLayout:
    """Megatron layout of the actor. ``seq_length`` is prompt + response tokens of one sequence."""

    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    seq_length: int
    recompute: bool = False  # full activation recomputation (uniform, one layer per checkpoint)
    sequence_parallel: bool = False
    params_bytes: int = 2  # bf16 weights (and logits)
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS  # float32 elements of the log-prob working chunk
    vocab_divisible_by: int = 128  # megatron's make_vocab_size_divisible_by

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class RolloutLayout:
    """Inference servers: each spans ``tp`` GPUs and holds both stacks and both KV caches."""

    tp: int
    servers: int
    max_seqs: int  # concurrent sequences a server keeps in its KV cache
    max_context: int  # tokens a sequence (prompt + response) may reach
    kv_bytes: int = 2  # bf16 KV cache
    weight_bytes: int = 2  # bf16 weights
    stacks: int = 2  # models a server holds: 2 for pi_mix, 1 when ref_weight is 0 (the policy alone)
    batched_tokens: int = VLLM_BATCHED_TOKENS  # vLLM's max_num_batched_tokens: the size of its profile forward

    @property
    def gpus(self) -> int:
        return self.tp * self.servers


@dataclass(frozen=True)
class GPUSpec:
    """Memory of one GPU. An H100 80GB reports about 79.6 GiB; the reserve absorbs that and the CUDA context,
    NCCL buffers and fragmentation."""

    memory_gib: float = 80.0
    reserve_gib: float = 6.0

    @property
    def available(self) -> float:
        """Bytes a training GPU may fill, and the budget a rollout GPU's engine is given (``gpu_memory_gib``)."""
        return (self.memory_gib - self.reserve_gib) * GIB


# ------------------------------------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class Line:
    name: str
    formula: str
    bytes: float


@dataclass(frozen=True)
class SidePlan:
    """One kind of GPU: its memory lines, where it is (``where``) and how many such GPUs the job uses."""

    name: str  # "training GPU" | "rollout GPU"
    where: str
    gpus: int
    lines: tuple[Line, ...]
    advice: dict[str, str] = field(default_factory=dict)  # line name -> how to shrink it
    note: str = ""  # printed under the table (e.g. the other end of the pipeline)

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.lines)

    def largest(self) -> Line:
        return max(self.lines, key=lambda line: line.bytes)


@dataclass(frozen=True)
class Plan:
    model: LlamaConfig
    training: SidePlan
    rollout: SidePlan
    gpu: GPUSpec
    parameters: int  # the model's parameter count (Hugging Face, unpadded vocabulary)

    @property
    def sides(self) -> tuple[SidePlan, SidePlan]:
        return (self.training, self.rollout)

    def problems(self) -> list[str]:
        """One message for each kind of GPU that does not fit (empty when everything fits)."""
        out = []
        avail = self.gpu.available
        for side in self.sides:
            if side.total > avail:
                big = side.largest()
                out.append(
                    f"{side.name} ({side.where}): {gib(side.total)} GiB needed > {gib(avail)} GiB available "
                    f"({self.gpu.memory_gib:g} GiB - {self.gpu.reserve_gib:g} GiB reserve); largest: {big.name} "
                    f"{gib(big.bytes)} GiB — {side.advice.get(big.name, 'change the layout')}"
                )
        return out

    @property
    def fits(self) -> bool:
        return not self.problems()


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _n(x: float) -> str:
    """A count, compactly: 1.05e9 -> '1.05G', 131072 -> '131,072'."""
    for unit, size in (("G", 1e9), ("M", 1e6)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:,.0f}"


# ------------------------------------------------------------------------------------------------ counting


def _layer_sharded(cfg: LlamaConfig) -> int:
    """Parameters of one decoder layer that tensor parallelism splits (linears, q/k/v bias)."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * head_dim(cfg)
    attn = h * h + 2 * h * kv + h * h  # q, k, v, o
    bias = (h + 2 * kv) if cfg.qkv_bias else 0
    return attn + bias + 3 * h * cfg.intermediate_size  # gate, up, down


def _layer_replicated(cfg: LlamaConfig) -> int:
    return 2 * cfg.hidden_size  # the two RMSNorm weights


def head_dim(cfg: LlamaConfig) -> int:
    return cfg.hidden_size // cfg.num_attention_heads


def parameter_count(cfg: LlamaConfig, vocab: int | None = None) -> int:
    """All parameters of the model, as Hugging Face counts them (``vocab`` defaults to the unpadded one)."""
    v = cfg.vocab_size if vocab is None else vocab
    h = cfg.hidden_size
    layers = cfg.num_hidden_layers * (_layer_sharded(cfg) + _layer_replicated(cfg))
    return v * h + layers + h + (0 if cfg.tie_word_embeddings else v * h)


def stage_parameters(cfg: LlamaConfig, tp: int, pp: int, stage: int, vocab_divisible_by: int = 128) -> int:
    """Parameters one GPU holds on pipeline ``stage`` under megatron's TP x PP split (padded vocabulary).

    With tied embeddings and ``pp > 1`` megatron keeps a copy of the embedding as the last stage's output
    layer (kept in sync by an all-reduce), so both ends hold it.
    """
    vp = padded_vocab_size(cfg.vocab_size, tp, vocab_divisible_by)
    h = cfg.hidden_size
    n = cfg.num_hidden_layers // pp * (_layer_sharded(cfg) // tp + _layer_replicated(cfg))
    first, last = stage == 0, stage == pp - 1
    if first:
        n += vp * h // tp
    if last:
        n += h  # final norm
        if not cfg.tie_word_embeddings or pp > 1:
            n += vp * h // tp
    return n


def activation_bytes_per_token_layer(cfg: LlamaConfig, tp: int, sequence_parallel: bool) -> tuple[float, str]:
    """Bytes a token one layer keeps for its backward without recomputation (module docstring), and formula."""
    h, i, a = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    kvd = cfg.num_key_value_heads * head_dim(cfg)
    split = 4 * h + 4 * kvd + 6 * i + 4 * a
    if sequence_parallel:
        return (8 * h + split) / tp, "(8h + 4h + 4kv*d + 6I + 4a)/TP"
    return 8 * h + split / tp, "8h + (4h + 4kv*d + 6I + 4a)/TP"


# ------------------------------------------------------------------------------------------------ planning


def _check_layout(cfg: LlamaConfig, train: TrainingLayout, rollout: RolloutLayout) -> None:
    for name, value in (
        ("training tp", train.tp), ("training pp", train.pp), ("training dp", train.dp),
        ("micro_batch_size", train.micro_batch_size), ("seq_length", train.seq_length),
        ("rollout tp", rollout.tp), ("rollout servers", rollout.servers),
        ("rollout max_seqs", rollout.max_seqs), ("rollout max_context", rollout.max_context),
    ):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for what, count in (
        ("num_attention_heads", cfg.num_attention_heads),
        ("num_key_value_heads", cfg.num_key_value_heads),
    ):
        if count % train.tp:
            raise ValueError(f"training tp={train.tp} does not divide {what}={count}")
    if cfg.num_hidden_layers % train.pp:
        raise ValueError(f"training pp={train.pp} does not divide num_hidden_layers={cfg.num_hidden_layers}")
    kv = cfg.num_key_value_heads
    if cfg.num_attention_heads % rollout.tp or (kv % rollout.tp and rollout.tp % kv):
        raise ValueError(
            f"rollout tp={rollout.tp} must divide num_attention_heads={cfg.num_attention_heads} and divide or be "
            f"a multiple of num_key_value_heads={kv}"
        )


def _training_stage(cfg: LlamaConfig, t: TrainingLayout, stage: int) -> list[Line]:
    p = stage_parameters(cfg, t.tp, t.pp, stage, t.vocab_divisible_by)
    b = t.params_bytes
    where = f"P_stage = {_n(p)} params on stage {stage}"
    lines = [
        Line("policy weights", f"{b} B x P_stage ({where})", b * p),
        Line("gradients", "4 B x P_stage (fp32 grad buffer)", 4 * p),
        Line("optimizer state", f"12 B x P_stage / DP={t.dp} (fp32 master + Adam m, v; distributed)", 12 * p / t.dp),
        Line("reference weights", f"{b} B x P_stage (frozen, same sharding)", b * p),
    ]

    h, s, mb, layers = cfg.hidden_size, t.seq_length, t.micro_batch_size, cfg.num_hidden_layers // t.pp
    in_flight = t.pp - stage  # 1F1B: stage i holds PP - i micro-batches
    full, full_f = activation_bytes_per_token_layer(cfg, t.tp, t.sequence_parallel)
    tokens = s * mb
    if t.recompute:
        inp = 2 * h / (t.tp if t.sequence_parallel else 1)
        sp = "/TP" if t.sequence_parallel else ""
        act = tokens * (in_flight * layers * inp + full)
        act_f = (
            f"s*b*[{in_flight} in flight x {layers} layers x 2h{sp} (layer inputs) + 1 layer x ({full_f}) "
            f"(recomputed)], s*b={tokens}"
        )
    else:
        act = tokens * in_flight * layers * full
        act_f = f"s*b x {in_flight} in flight x {layers} layers x ({full_f}), s*b={tokens}"
    lines.append(Line("activations", act_f, act))

    if stage == t.pp - 1:  # the pi_mix loss runs on the last stage
        vl = padded_vocab_size(cfg.vocab_size, t.tp, t.vocab_divisible_by) // t.tp
        chunk_rows = min(max(1, t.chunk_elements // vl), tokens)
        logp = 3 * tokens * vl * b + 4 * chunk_rows * vl
        logp_f = f"(2 models + 1 grad) x s*b x V/TP={vl} x {b} B + fp32 chunk {chunk_rows} x V/TP x 4 B"
        lines.append(Line("log-prob buffers", logp_f, logp))
    return lines


def _last_stage_note(lines: list[Line]) -> str:
    """The last stage holds the output layer and runs the pi_mix loss: show it when it is not the worst."""
    parts = ", ".join(f"{line.name} {gib(line.bytes)}" for line in lines)
    return f"Last stage (output layer, pi_mix loss): {gib(sum(line.bytes for line in lines))} GiB = {parts} GiB."


def plan(cfg: LlamaConfig, training: TrainingLayout, rollout: RolloutLayout, gpu: GPUSpec | None = None) -> Plan:
    """Memory per GPU of ``training`` (its worst pipeline stage) and of ``rollout`` for model ``cfg``.

    Raises:
        ValueError: for a layout the model cannot take (TP not dividing the heads, PP not dividing the layers).
    """
    gpu = gpu or GPUSpec()
    _check_layout(cfg, training, rollout)
    stages = [_training_stage(cfg, training, i) for i in range(training.pp)]
    worst = max(range(training.pp), key=lambda i: sum(line.bytes for line in stages[i]))
    recompute_hint = "" if training.recompute else "turn on activation recomputation (--recompute), "
    train_side = SidePlan(
        "training GPU",
        f"TP{training.tp} x PP{training.pp} x DP{training.dp}, worst stage {worst} of {training.pp}",
        training.gpus,
        tuple(stages[worst]),
        {
            "policy weights": "raise tensor or pipeline parallel",
            "reference weights": "raise tensor or pipeline parallel",
            "gradients": "raise tensor or pipeline parallel",
            "optimizer state": "raise data parallel (the distributed optimizer shards it) or tensor/pipeline parallel",
            "activations": f"{recompute_hint}lower the micro-batch size or sequence length, or raise tensor parallel",
            "log-prob buffers": "lower the micro-batch size or raise tensor parallel",
        },
        _last_stage_note(stages[-1]) if worst != training.pp - 1 else "",
    )

    r = rollout
    params = parameter_count(cfg)
    weights = r.stacks * r.weight_bytes * params / r.tp
    kv_heads = max(1, cfg.num_key_value_heads // r.tp)  # below one head a rank, heads are replicated
    per_token = r.stacks * cfg.num_hidden_layers * 2 * kv_heads * head_dim(cfg) * r.kv_bytes
    tokens = r.max_seqs * r.max_context
    kv = per_token * tokens
    # vLLM's non-KV memory inside its budget (NCCL's buffers come before its memory snapshot, so outside): the
    # profile forward's largest transient (one layer of batched_tokens tokens: residual + normed input, q/k/v
    # out, gate/up out, SwiGLU out, bf16) and the sampler's float32 logits (both stacks, their average and
    # the processed copy) of max_seqs rows.
    h, i = cfg.hidden_size, cfg.intermediate_size
    kvd = cfg.num_key_value_heads * head_dim(cfg)
    act = r.batched_tokens * 2 * (2 * h + (h + 2 * kvd) / r.tp + 3 * i / r.tp)
    workspace = act + 4 * 4 * r.max_seqs * cfg.vocab_size
    workspace_f = (f"{r.batched_tokens} tokens x 2 B x (2h + (h + 2kv*d)/TP + 3I/TP) + 4 x 4 B x {r.max_seqs} "
                   f"seqs x V={cfg.vocab_size} (vLLM's profile forward and sampler)")  # fmt: skip
    room = max(0.0, gpu.available - weights - act)
    max_seqs = int(room // (per_token * r.max_context + 16 * cfg.vocab_size))
    # ref_weight 0 (the KL baseline) serves the policy alone: one stack, one KV cache.
    w_name, kv_name = ("policy + reference weights", "KV cache (both stacks)") if r.stacks == 2 else (
        "policy weights", "KV cache")  # fmt: skip
    models = f"{r.stacks} model{'s' * (r.stacks > 1)}"
    kv_f = (f"{models} x {cfg.num_hidden_layers} layers x 2 (K,V) x {kv_heads} kv heads/TP x "
            f"{head_dim(cfg)} x {r.kv_bytes} B x {r.max_seqs} seqs x {r.max_context} tokens")  # fmt: skip
    rollout_side = SidePlan(
        "rollout GPU",
        f"server TP{r.tp}, {r.servers} servers",
        r.gpus,
        (
            Line(w_name, f"{models} x {r.weight_bytes} B x {_n(params)} params / TP={r.tp}", weights),
            Line(kv_name, kv_f, kv),
            Line("engine workspace", workspace_f, workspace),
        ),
        {
            w_name: "raise rollout tensor parallel",
            "engine workspace": "lower the rollout seqs or vLLM's max_num_batched_tokens",
            kv_name: f"lower rollout seqs to <= {max_seqs} at context {r.max_context}, lower the "
            "context, or raise rollout tensor parallel",
        },
    )
    return Plan(cfg, train_side, rollout_side, gpu, params)


def check(result: Plan) -> Plan:
    """Return ``result`` when every GPU fits; otherwise raise ValueError naming what breaks it and by how much."""
    problems = result.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return result


def format_plan(result: Plan) -> str:
    """The plan as markdown: one table a kind of GPU, each line with its formula."""
    cfg = result.model
    out = [
        f"Model: {_n(result.parameters)} params, vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads ({cfg.num_key_value_heads} KV), "
        f"intermediate {cfg.intermediate_size}, tied embeddings {cfg.tie_word_embeddings}.",
        f"GPU: {result.gpu.memory_gib:g} GiB - {result.gpu.reserve_gib:g} GiB reserve = "
        f"{gib(result.gpu.available)} GiB available. GPUs: {result.training.gpus} training + "
        f"{result.rollout.gpus} rollout = {result.training.gpus + result.rollout.gpus}.",
    ]
    for side in result.sides:
        fits = "fits" if side.total <= result.gpu.available else "DOES NOT FIT"
        out += ["", f"### {side.name} ({side.where}): {gib(side.total)} GiB, {fits}", "",
                "| component | formula | GiB |", "|---|---|---:|"]  # fmt: skip
        out += [f"| {line.name} | {line.formula} | {gib(line.bytes)} |" for line in side.lines]
        out.append(f"| **total** | | **{gib(side.total)}** |")
        if side.note:
            out += ["", side.note]
    return "\n".join(out)


def plan_config(cfg: GRPOConfig) -> Plan:
    """The plan of a GRPO config with a ``cluster`` section: training at model.tensor_parallel x
    model.pipeline_parallel over the trainer nodes, micro-batches of ``train.micro_batch_size`` sequences of
    ``cluster.max_context`` tokens, or of ``train.max_tokens_per_micro_batch`` tokens when that is set (no
    activation recomputation: the actor does not use it); rollout servers of ``cluster.rollout_tp`` GPUs holding
    both stacks (the policy alone when ref_weight is 0). ``model.policy`` is a Hugging Face directory or a preset
    name (``llama3-70b``) when the weights are not at hand.

    Raises:
        ValueError: the config has no cluster section, or the model cannot take the layout.
    """
    c, m = cfg.cluster, cfg.model
    if c is None:
        raise ValueError("the config has no cluster section: nothing to plan (give --model and a layout instead)")
    gpus = c.trainer_nodes * c.gpus_per_node
    dp = gpus // (m.tensor_parallel * m.pipeline_parallel)
    budget = cfg.train.max_tokens_per_micro_batch  # activations scale with rows x length: plan budget tokens
    mb, seq = (1, budget) if budget else (cfg.train.micro_batch_size, c.max_context)
    training = TrainingLayout(m.tensor_parallel, m.pipeline_parallel, dp, mb, seq)
    stacks = 2 if cfg.algorithm.ref_weight > 0 else 1
    rollout = RolloutLayout(c.rollout_tp, c.rollout_nodes * c.servers_per_node, c.rollout_max_seqs, c.max_context,
                            stacks=stacks)  # fmt: skip
    return plan(resolve_model(m.policy), training, rollout, GPUSpec(c.gpu_memory_gib))
