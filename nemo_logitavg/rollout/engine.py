"""Engines that sample completions from pi_mix, and the torch engine for CPUs and tests.

pi_mix (docs/design.md §1) for a context s, reference weight ``a`` and temperature ``T``:

    m(s) = (1 - a) * z_pol(s) + a * z_ref(s),      pi_mix(.|s) = softmax(m(s) / T)

Conventions every engine follows (docs/design.md §7, wire format and determinism):

- The returned log-prob of a sampled token is log pi_mix at the request's temperature, computed *before* top-p
  truncation, in float32: the quantity the trainer's ``mixed_logprobs`` recomputes. With top_p < 1 the tokens
  come from the truncated distribution, so ratios against these log-probs are off-policy (the client warns).
- Greedy decoding when ``temperature == 0``: the argmax of ``m``; its log-prob is then log pi_mix at ``T = 1``.
  A temperature in ``(0, MIN_TEMPERATURE)`` is refused (ValueError; the server answers 400) rather than quietly
  made greedy: ``m / T`` overflows float32 near ``T = 1e-38`` (NaN log-probs), and a caller asking for such a
  ``T`` should say ``0`` if greedy is what it means.
- Each sequence (sample ``j`` of a request with seed ``s``) draws its randomness from its own
  ``torch.Generator`` seeded with ``seeds.sequence_seed(s, j)``, one uniform number per generated token (inverse-CDF
  sampling), so a completion does not depend on which other sequences share its batch.
- A completion stops at a stop token id (the models' EOS ids unless ``ignore_eos``, plus ``stop_token_ids``),
  finish_reason ``"stop"``, the token kept in ``token_ids`` (the trainer learns to stop) but not in ``text``; at a
  stop string, finish_reason ``"stop"``, ``text`` cut before the string and ``token_ids`` ending with the token
  that completed it; at ``max_tokens`` or the model's context length, finish_reason ``"length"``.

A vLLM engine (an out-of-tree model holding both stacks, averaging in ``compute_logits``; docs/design.md §5) is added
by implementing ``Engine``; the server only talks to that protocol.

Tokenizer: the policy directory's tokenizer (else the reference's) when it has one. A directory without tokenizer
files puts the engine in token-id mode: prompts must be token ids, ``text`` fields are empty strings and stop
strings are refused (``has_tokenizer`` is False).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file

from nemo_logitavg.ops.ref_weight import check_ref_weight, mixes_reference
from nemo_logitavg.rollout import weight_wire
from nemo_logitavg.rollout.weight_receiver import WeightReceiver
from nemo_logitavg.seeds import sequence_seed

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_CONFIG_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


MIN_TEMPERATURE = 1e-3  # the smallest temperature above 0 (see the module docstring)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature < float("inf")):
            raise ValueError(
                f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass
class GenerationRequest:
    """``n`` completions of one prompt; sample ``j`` uses the generator seeded with ``sequence_seed(seed, j)``."""

    prompt_token_ids: list[int]
    params: SamplingParams
    n: int = 1
    seed: int = 0
    cancel: threading.Event | None = None  # set: stop decoding (the client went away); generate raises Cancelled


class Cancelled(Exception):
    """``generate`` stopped because a request's ``cancel`` event was set."""


@dataclass
class GeneratedSequence:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" or "length"


@runtime_checkable
class Engine(Protocol):
    """What the server drives. Implementations serialise ``generate`` and ``load_policy`` themselves."""

    ref_weight: float
    policy_step: int
    vocab_size: int
    max_model_len: int
    has_tokenizer: bool

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GeneratedSequence]]:
        """For each request, its ``n`` completions in sample order."""

    def load_policy(self, path: str, step: int) -> None:
        """Replace the policy weights (only those) by the Hugging Face directory ``path``; serve ``step``."""

    # The collective push (``weight_wire``, ``weight_receiver``): ranks taken in a weight-update group, the digest
    # of the tensors a push carries, joining the groups, and landing a push.
    weight_receivers: int
    policy_manifest: str

    def join_weight_groups(self, specs: Sequence, rank: int) -> None: ...

    def receive_policy(self, plans: dict, dtype: torch.dtype, step: int, timeout_s: float) -> None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """One string per token for the OpenAI ``logprobs.tokens`` field."""

    def info(self) -> dict: ...

    def alive(self) -> bool:
        """False once the engine cannot serve any more (e.g. vLLM's engine process died): /health answers 503."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (bit-identity checks across processes)."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _has_tokenizer(path: str | None) -> bool:
    return path is not None and any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES)


def _eos_ids(model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return ids


def _safetensors_state(path: str) -> dict[str, torch.Tensor]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(os.path.join(path, file)))
    return state


class EngineCommon:
    """What both engines share: text <-> token ids through ``self.tokenizer`` (None: token-id mode), the checks
    of a request against ``self.vocab_size`` / ``self.max_model_len``, and ``info`` (``engine_name`` names it)."""

    engine_name: str
    tokenizer = None
    vocab_size: int
    max_model_len: int

    def info(self) -> dict:
        return {
            "ref_weight": self.ref_weight,
            "policy_step": self.policy_step,
            "policy_path": self.policy_path,
            "reference_path": self.reference_path,
            "vocab_size": self.vocab_size,
            "max_model_len": self.max_model_len,
            "engine": self.engine_name,
            "dtype": str(self.dtype).removeprefix("torch."),  # the served weights' dtype, e.g. "float32"
            "has_tokenizer": self.has_tokenizer,
        }

    def alive(self) -> bool:
        """The torch engine decodes in the calling thread and keeps no state across calls: while the process
        answers it can serve (a failed call is that request's 500). Engines with processes of their own
        override this."""
        return True

    def _check_request(self, request: GenerationRequest) -> None:
        ids = request.prompt_token_ids
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"unknown token id(s) {bad[:8]} (vocabulary size {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        bad_stop = [t for t in request.params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad_stop:
            raise ValueError(f"unknown stop token id(s) {bad_stop[:8]} (vocabulary size {self.vocab_size})")
        if request.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this server runs in token-id mode")
        if request.n < 1:
            raise ValueError(f"n must be >= 1, got {request.n}")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this server has no tokenizer (token-id mode): send prompts as token ids")
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(t) for t in token_ids]
        return [str(t) for t in self.tokenizer.convert_ids_to_tokens(list(token_ids))]


@dataclass
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None


class TorchEngine(EngineCommon):
    """pi_mix from two Hugging Face causal LMs (policy and reference), each with its own ``DynamicCache``.

    Args:
        policy_path, reference_path: Hugging Face directories (same vocabulary). ``reference_path`` may be None
            only with ``ref_weight == 0`` (the policy alone, e.g. for a throughput baseline).
        ref_weight: ``a`` in [0, 1].
        dtype: the models' dtype (float32 by default); mixing and softmax are always float32.
        max_batch_size: sequences decoded together (longer request lists are split).
        policy_step: the step the initial policy weights belong to.
        device: where both models run (e.g. ``cuda:0``); sampling and its generators stay on the host, so a
            seed gives the same draws on every device.
    """

    engine_name = "torch"

    def __init__(
        self,
        policy_path: str,
        reference_path: str | None,
        ref_weight: float,
        dtype: torch.dtype = torch.float32,
        max_batch_size: int = 256,
        policy_step: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        # transformers takes ~1 s to import: the server and the vLLM engine import this module without needing it
        from transformers import AutoModelForCausalLM

        if reference_path is None and mixes_reference(ref_weight):
            raise ValueError("a reference model is required unless ref_weight == 0")
        self.ref_weight = check_ref_weight(ref_weight)
        self.dtype = dtype
        self.max_batch_size = int(max_batch_size)
        self.policy_path = os.fspath(policy_path)
        self.reference_path = os.fspath(reference_path) if reference_path is not None else None
        self.policy_step = int(policy_step)
        self.device = torch.device(device)
        self._lock = threading.Lock()

        def load(path: str):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device)
            model.eval().requires_grad_(False)
            return model

        self.policy = load(self.policy_path)
        self.reference = load(self.reference_path) if self.reference_path is not None else None
        self._shape = self._config_shape(self.policy.config.to_dict())
        if self.reference is not None:
            ref_shape = self._config_shape(self.reference.config.to_dict())
            if ref_shape["vocab_size"] != self._shape["vocab_size"]:
                raise ValueError(
                    f"policy and reference vocabularies differ ({self._shape['vocab_size']} vs "
                    f"{ref_shape['vocab_size']}): logits cannot be averaged"
                )
        self.vocab_size = int(self._shape["vocab_size"])
        self.max_model_len = int(getattr(self.policy.config, "max_position_embeddings", 1 << 30))
        if self.reference is not None:
            self.max_model_len = min(
                self.max_model_len, int(getattr(self.reference.config, "max_position_embeddings", 1 << 30))
            )
        self.eos_token_ids = _eos_ids(self.policy) | (_eos_ids(self.reference) if self.reference is not None else set())

        self.tokenizer = None
        for path in (self.policy_path, self.reference_path):
            if _has_tokenizer(path):
                # transformers is heavy (~1 s): imported with the models above, not by importers of this module
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(path)
                if self.tokenizer.eos_token_id is not None:
                    self.eos_token_ids.add(int(self.tokenizer.eos_token_id))
                break
        self.has_tokenizer = self.tokenizer is not None
        self.eos_token_ids = {i for i in self.eos_token_ids if 0 <= i < self.vocab_size}
        pad = getattr(self.policy.config, "pad_token_id", None)
        self._pad_id = int(pad) if isinstance(pad, int) and 0 <= pad < self.vocab_size else 0
        # transformers 5.x renamed the forward's ``past_key_values`` to ``cache`` (the old name is deprecated).
        forward_args = inspect.signature(type(self.policy).forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_args else "past_key_values"


    # ------------------------------------------------------------------------------------------- weights

    @staticmethod
    def _config_shape(config: dict) -> dict:
        shape = {key: config.get(key) for key in _CONFIG_SHAPE_KEYS}
        if shape["num_key_value_heads"] is None:
            shape["num_key_value_heads"] = shape["num_attention_heads"]
        shape["tie_word_embeddings"] = bool(shape["tie_word_embeddings"])
        return shape

    def load_policy(self, path: str, step: int) -> None:
        """Reload only the policy from the Hugging Face safetensors directory ``path`` and serve ``step``.

        Every tensor is read and checked before any is copied, so a bad directory leaves the served weights
        untouched; the copy happens under the engine lock, between generate calls.
        """
        path = os.fspath(path)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{config_file} does not exist")
        with open(config_file, encoding="utf-8") as f:
            shape = self._config_shape(json.load(f))
        if shape != self._shape:
            diff = {k: (self._shape[k], shape[k]) for k in shape if shape[k] != self._shape[k]}
            raise ValueError(f"{path} describes another model than the served policy (served, new): {diff}")
        state = _safetensors_state(path)
        expected = self.policy.state_dict()
        tied = self._shape["tie_word_embeddings"]
        optional = {"lm_head.weight"} if tied else set()
        missing = sorted(set(expected) - set(state) - optional)
        unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("rotary_emb.inv_freq"))
        if missing or unexpected:
            raise ValueError(f"{path}: missing weights {missing[:8]}, unexpected weights {unexpected[:8]}")
        for name, tensor in state.items():
            if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
                want = tuple(expected[name].shape)
                raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {want}")
        with self._lock, torch.no_grad():
            for name, tensor in state.items():
                if name in expected:
                    expected[name].copy_(tensor.to(expected[name].dtype))
            self.policy_path = path
            self.policy_step = int(step)

    # -------------------------------------------------------------------------------- the collective push

    weight_receivers = 1  # ranks this engine takes in a weight-update group (one process holds the weights)

    def _pushed_shapes(self) -> dict[str, tuple[int, ...]]:
        """The policy tensors a push carries: its Hugging Face state minus the tied head and rotary buffers."""
        state = self.policy.state_dict()
        skip = {"lm_head.weight"} if self._shape["tie_word_embeddings"] else set()
        return {n: tuple(t.shape) for n, t in state.items() if n not in skip and not n.endswith("rotary_emb.inv_freq")}

    @property
    def policy_manifest(self) -> str:
        return weight_wire.policy_manifest(self._pushed_shapes().items())

    def weight_digests(self) -> dict[str, dict[str, str]]:
        """sha256 of every served tensor's bytes, by Hugging Face name, for ``policy`` and ``reference``: lets an
        operator (and the tests) check that a push landed bit for bit and left the reference untouched."""
        out = {}
        for half, model in (("policy", self.policy), ("reference", self.reference)):
            if model is not None:
                out[half] = {name: tensor_digest(t) for name, t in model.state_dict().items()}
        return out

    def join_weight_groups(self, specs: Sequence, rank: int) -> None:
        """Join the trainer's weight-update groups (``weight_wire.GroupSpec`` per stage) as ``rank``; returns at
        once, the groups form in the background."""
        if getattr(self, "_receiver", None) is None:
            self._receiver = WeightReceiver()
        self._receiver.join(specs, rank)
        self._receive_device = self.device if all(s.backend == "nccl" for s in specs) else torch.device("cpu")

    def receive_policy(self, plans: dict, dtype: torch.dtype, step: int, timeout_s: float) -> None:
        """Land a push of the policy half (``plans``: stage -> buckets of (name, shape)) and serve it as ``step``.

        The plan is checked against the served policy before anything moves. Buckets are copied into the
        weights as they land, so a push that fails midway leaves the policy mixed: the caller (the server)
        serves nothing until a complete push lands.

        Raises:
            ValueError: the plan names other tensors or shapes than the served policy's.
            RuntimeError: no groups were joined, or the push failed or timed out.
        """
        expected = self._pushed_shapes()
        planned = {name: tuple(shape) for plan in plans.values() for bucket in plan for name, shape in bucket}
        if planned != expected:
            wrong = sorted(set(planned) ^ set(expected)) or sorted(n for n in planned if planned[n] != expected[n])
            raise ValueError(f"the push plan does not match the served policy: {wrong[:8]}")
        if getattr(self, "_receiver", None) is None:
            raise RuntimeError("no weight-update group was joined (POST /v1/weights/join first)")
        state = self.policy.state_dict()

        def load(bucket: list) -> None:
            with torch.no_grad():
                for name, tensor in bucket:
                    if tensor.data_ptr() != state[name].data_ptr():  # else it was received in place
                        state[name].copy_(tensor)

        with self._lock:
            self._receiver.receive(plans, dtype, load, timeout_s, device=self._receive_device,
                                   into=lambda name, shape: state[name])  # fmt: skip
            self.policy_path, self.policy_step = None, int(step)

    # ------------------------------------------------------------------------------------------ decoding

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GeneratedSequence]]:
        sequences: list[list[_Sequence]] = []
        for request in requests:
            self._check_request(request)
            stop_ids = set(request.params.stop_token_ids)
            if not request.params.ignore_eos:
                stop_ids |= self.eos_token_ids
            sequences.append(
                [
                    _Sequence(
                        prompt=list(request.prompt_token_ids),
                        params=request.params,
                        generator=torch.Generator().manual_seed(sequence_seed(request.seed, j)),
                        stop_ids=frozenset(stop_ids),
                    )
                    for j in range(request.n)
                ]
            )
        flat = [seq for group in sequences for seq in group]
        events = {id(r.cancel): r.cancel for r in requests if r.cancel is not None}.values()

        def cancelled() -> bool:
            return any(event.is_set() for event in events)

        with self._lock, torch.inference_mode():
            for start in range(0, len(flat), self.max_batch_size):
                self._decode(flat[start : start + self.max_batch_size], cancelled)
        return [
            [GeneratedSequence(s.token_ids, s.logprobs, s.text or "", s.finish_reason or "length") for s in group]
            for group in sequences
        ]

    def _mixed_logits(self, input_ids, attention_mask, position_ids, caches) -> torch.Tensor:
        """``m`` of the last position of every row, float32 ``[B, V]`` on the host (host inputs, models on
        ``self.device``)."""
        input_ids, attention_mask, position_ids = (t.to(self.device) for t in (input_ids, attention_mask, position_ids))
        kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        z_pol = self.policy(input_ids=input_ids, **{self._cache_kwarg: caches[0]}, **kwargs).logits[:, -1].float()
        if self.reference is None or not mixes_reference(self.ref_weight):
            return z_pol[:, : self.vocab_size].cpu()
        z_ref = self.reference(input_ids=input_ids, **{self._cache_kwarg: caches[1]}, **kwargs).logits[:, -1].float()
        a = self.ref_weight
        return ((1.0 - a) * z_pol + a * z_ref)[:, : self.vocab_size].cpu()

    def _decode(self, seqs: list[_Sequence], cancelled=lambda: False) -> None:
        """Decode ``seqs`` together: one left-padded prefill of their distinct prompts (the n samples of a prompt
        share it; the caches are then expanded row by row), then one token per live row per step; finished rows
        leave the batch and the caches."""
        # transformers is heavy (~1 s): loaded by __init__ when the models are, not by importers of this module
        from transformers import DynamicCache

        distinct: dict[tuple[int, ...], int] = {}
        row_of = [distinct.setdefault(tuple(s.prompt), len(distinct)) for s in seqs]
        prompts = list(distinct)
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - lengths[i] :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - lengths[i] :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        caches = [DynamicCache(), DynamicCache()]
        logits = self._mixed_logits(input_ids, mask, positions, caches)
        rows = torch.tensor(row_of, dtype=torch.long)
        if len(prompts) < len(seqs):
            for cache in caches:
                if cache.get_seq_length() > 0:
                    cache.batch_select_indices(rows)
        logits, mask = logits[rows], mask[rows]
        next_pos = torch.tensor(lengths, dtype=torch.long)[rows]
        active = list(seqs)
        temps = torch.tensor([s.params.temperature for s in active], dtype=torch.float32)
        top_ps = torch.tensor([s.params.top_p for s in active], dtype=torch.float32)
        while True:
            if cancelled():  # checked between decoding steps: a dropped request stops within one step
                raise Cancelled("the request was cancelled")
            tokens, logps = sample_tokens(logits, temps, top_ps, [s.generator for s in active])
            keep = []
            for i, s in enumerate(active):
                self._append(s, int(tokens[i]), float(logps[i]))
                if s.finish_reason is None:
                    keep.append(i)
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long)
                for cache in caches:
                    if cache.get_seq_length() > 0:
                        cache.batch_select_indices(index)
                mask, next_pos, tokens = mask[index], next_pos[index], tokens[index]
                temps, top_ps = temps[index], top_ps[index]
                active = [active[i] for i in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            logits = self._mixed_logits(tokens[:, None], mask, next_pos[:, None], caches)
            next_pos = next_pos + 1

    def _append(self, s: _Sequence, token: int, logprob: float) -> None:
        s.token_ids.append(token)
        s.logprobs.append(logprob)
        if token in s.stop_ids:
            s.finish_reason = "stop"
            s.text = self.decode(s.token_ids[:-1])
            return
        if s.params.stop:
            text = self.decode(s.token_ids)
            hits = [text.find(stop) for stop in s.params.stop if stop and stop in text]
            if hits:
                s.finish_reason = "stop"
                s.text = text[: min(hits)]
                return
        if len(s.token_ids) >= s.params.max_tokens or len(s.prompt) + len(s.token_ids) >= self.max_model_len:
            s.finish_reason = "length"
            s.text = self.decode(s.token_ids)


def sample_tokens(
    logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of mixed logits ``m`` ``[B, V]``, and its log pi_mix (before top-p truncation).

    Row ``i`` draws one float64 uniform from ``generators[i]`` (greedy rows draw none) and inverts the CDF of
    softmax(m_i / T_i) in vocabulary order, or, when ``top_p_i < 1``, of the renormalised nucleus in descending
    probability order (ties kept in vocabulary order). Each row's result depends on that row alone.
    """
    greedy = temperatures == 0
    temps = torch.where(greedy, torch.ones_like(temperatures), temperatures)
    logp = torch.log_softmax(logits.float() / temps[:, None], dim=-1)
    tokens = logits.argmax(dim=-1)
    rows = [i for i in range(logits.shape[0]) if not bool(greedy[i])]
    if rows:
        index = torch.tensor(rows, dtype=torch.long)
        u = torch.stack([torch.rand((), generator=generators[i], dtype=torch.float64) for i in rows])
        probs = logp[index].double().exp()
        last = probs.shape[-1] - 1
        cdf = probs.cumsum(-1)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=last)
        nucleus = top_ps[index] < 1.0
        if bool(nucleus.any()):
            sub = nucleus.nonzero()[:, 0]
            sorted_p, order = torch.sort(probs[sub], dim=-1, descending=True, stable=True)
            keep = (sorted_p.cumsum(-1) - sorted_p) < top_ps[index][sub].double()[:, None]
            keep[:, 0] = True
            ncdf = (sorted_p * keep).cumsum(-1)
            at = torch.searchsorted(ncdf, (u[sub] * ncdf[:, -1])[:, None], right=True).clamp(max=last)
            picked[sub] = order.gather(1, at)[:, 0]
        tokens[index] = picked
    return tokens, logp.gather(1, tokens[:, None])[:, 0]
