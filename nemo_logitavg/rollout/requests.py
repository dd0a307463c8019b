"""What the rollout server accepts: the request schemas, the limits a request must keep to (``ServerLimits``), and
the checks that turn a request body into work for the engine, each refusing with a ``BadRequest`` that names what
is wrong. The endpoints themselves are in ``server``; the protocol is described in its docstring.

Every check here runs before the work it bounds: a body is capped before it is parsed (``read_body``), and a
completion request's sizes are known to fit before any prompt is tokenized (``parse_completion``). Parsing runs
in worker threads, never on the event loop (see ``validate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Request
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from nemo_logitavg.rollout.engine import MIN_TEMPERATURE, Engine, SamplingParams
from nemo_logitavg.rollout.weight_wire import BucketPlan, GroupSpec, parse_dtype, plan_from_wire
from nemo_logitavg.seeds import prompt_seeds


@dataclass
class ServerLimits:
    """What one request may ask, checked before any work (GET /v1/models advertises them, and the client sizes its
    requests to them). The defaults admit every shipped config with one server (the largest, 64 prompts x 8
    samples x 4096 tokens = 2.1M work tokens; the evaluation's 256 prompts x 4 samples x 4096 = 4.2M).

    max_work_tokens bounds ``n * sum(len(prompt) + max_tokens)`` over the request's prompts; max_prompt_chars bounds
    each text prompt before it is tokenized (None: 32 x the model's context length, far above any real text of
    fewer tokens than the context); max_body_bytes bounds the request body (413 beyond it).
    """

    max_n: int = 64
    max_tokens: int = 4096
    max_prompts: int = 512
    max_stop: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 256
    max_prompt_chars: int | None = None
    max_work_tokens: int = 1 << 23
    max_body_bytes: int = 4 << 20
    push_timeout: float = 600.0  # seconds a policy push may take to land

    def resolved(self, max_model_len: int) -> ServerLimits:
        """These limits with ``max_prompt_chars`` filled in for a model of context ``max_model_len``."""
        chars = self.max_prompt_chars
        if chars is None:
            chars = min(32 * max_model_len, self.max_body_bytes)
        return dataclasses.replace(self, max_prompt_chars=int(chars))


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    prompt: Any  # a text, texts, token ids or lists of token ids: checked by parse_prompts (see validate)
    n: StrictInt = 1
    max_tokens: StrictInt | None = 16
    temperature: StrictFloat | StrictInt | None = 1.0
    top_p: StrictFloat | StrictInt | None = 1.0
    seed: StrictInt | None = None
    seeds: list[StrictInt] | None = None  # extension: one seed per prompt (see the server's docstring)
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    stream: StrictBool | None = False
    ignore_eos: StrictBool = False


class LoadWeightsRequest(BaseModel):
    path: StrictStr
    step: StrictInt
    run_id: StrictStr


class JoinRequest(BaseModel):
    groups: list[dict]
    rank: StrictInt


class UpdateRequest(BaseModel):
    step: StrictInt
    run_id: StrictStr
    dtype: StrictStr
    plan: dict
    timeout_s: StrictFloat | StrictInt | None = None  # the trainer's rollout.push_timeout (capped by the server's)


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx) and the message go back to the caller."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def validation_message(errors: list[dict]) -> str:
    """pydantic's validation errors as one line naming the fields at fault (at most six)."""
    parts = []
    for err in errors[:6]:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "JSON decode error")
            return f"invalid JSON body: {detail}"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw request body, refused with a 413 as soon as it exceeds ``limit`` bytes (before it is parsed)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BadRequest(f"the request body ({declared} bytes) exceeds this server's limit of {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body exceeds this server's limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def validate(model: type[BaseModel], raw: bytes) -> Any:
    """``raw`` JSON as ``model``; BadRequest naming the field at fault. Runs in a worker thread. A C or Rust
    parser holds the GIL for its whole call (pydantic's ``validate_json`` of an 8 MB body held the event loop for
    1.9 s here), so the only long call is ``json.loads`` of a capped body, and the big ``prompt`` field is checked
    by Python loops (``parse_prompts``), during which the event loop gets its turns."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc.errors())) from exc


def parse_prompts(prompt: Any) -> list:
    """The request's prompts as a list whose items are texts or lists of int token ids, else BadRequest."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list):
        raise BadRequest("prompt: must be a text, a list of texts, a list of token ids or a list of token-id lists")
    if prompt and all(type(t) is int for t in prompt):
        return [prompt]
    for k, p in enumerate(prompt):
        if not isinstance(p, str) and not (isinstance(p, list) and all(type(t) is int for t in p)):
            raise BadRequest(f"prompt.{k}: must be a text or a list of int token ids")
    return prompt


# -- /v1/completions: the checks in the order they run (cheap ones first, nothing tokenized before sizes fit) ----


def parse_completion(
    body: CompletionRequest, engine: Engine, limits: ServerLimits
) -> tuple[list[list[int]], SamplingParams, int, list[int]]:
    """The request's prompts (token ids), sampling parameters, n and per-prompt seeds; BadRequest naming the first
    limit exceeded. Cheap checks come first: nothing is tokenized before the sizes are known to fit."""
    _check_supported(body)
    max_tokens, temperature, top_p = _sampling_numbers(body, limits)
    stop = _stop_strings(body, engine, limits)
    stop_token_ids = body.stop_token_ids or []
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise BadRequest(f"at most {limits.max_stop_token_ids} stop_token_ids, got {len(stop_token_ids)}")

    prompts_raw = _counted_prompts(body.prompt, limits)
    n = body.n
    _check_work(n, max_tokens, [0] * len(prompts_raw), limits, "even with empty prompts,")
    _check_prompt_chars(prompts_raw, limits)
    lengths = [0 if isinstance(p, str) else len(p) for p in prompts_raw]
    _check_work(n, max_tokens, lengths, limits, "before tokenizing the text prompts,")
    prompts = [_prompt_tokens(k, p, engine) for k, p in enumerate(prompts_raw)]
    _check_work(n, max_tokens, [len(p) for p in prompts], limits, "")
    _check_token_ids(stop_token_ids, engine)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=body.ignore_eos,
    )
    return prompts, params, n, _prompt_seeds(body, len(prompts))


def _check_supported(body: CompletionRequest) -> None:
    """OpenAI options this server does not implement are refused, not ignored."""
    if body.stream:
        raise BadRequest("stream=true is not supported by this server")
    if body.echo:
        raise BadRequest("echo=true is not supported by this server")


def _sampling_numbers(body: CompletionRequest, limits: ServerLimits) -> tuple[int, float, float]:
    """``max_tokens``, ``temperature`` and ``top_p`` with their defaults filled in, after ``n``, each of them and
    ``logprobs`` are checked against their ranges."""
    if not 1 <= body.n <= limits.max_n:
        raise BadRequest(f"n={body.n} is outside this server's limits [1, {limits.max_n}]")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise BadRequest(f"max_tokens={max_tokens} is outside this server's limits [1, {limits.max_tokens}]")
    temperature = 1.0 if body.temperature is None else float(body.temperature)
    top_p = 1.0 if body.top_p is None else float(body.top_p)
    if not (temperature == 0 or (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE)):
        raise BadRequest(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must lie in (0, 1], got {top_p}")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise BadRequest(f"logprobs must lie in [0, 5], got {body.logprobs}")
    return max_tokens, temperature, top_p


def _stop_strings(body: CompletionRequest, engine: Engine, limits: ServerLimits) -> tuple[str, ...]:
    """The stop strings as a tuple, within the count and length limits, and only where there is a tokenizer."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > limits.max_stop:
        raise BadRequest(f"at most {limits.max_stop} stop strings, got {len(stop)}")
    long_stop = [k for k, text in enumerate(stop) if len(text) > limits.max_stop_chars]
    if long_stop:
        raise BadRequest(f"stop string {long_stop[0]} is longer than this server's limit of {limits.max_stop_chars}")
    if stop and not engine.has_tokenizer:
        raise BadRequest("stop strings need a tokenizer; this server runs in token-id mode (no tokenizer files)")
    return stop


def _counted_prompts(prompt: Any, limits: ServerLimits) -> list:
    """The prompts (``parse_prompts``), at least one and at most ``max_prompts``."""
    prompts = parse_prompts(prompt)
    if not prompts:
        raise BadRequest("prompt is empty")
    if len(prompts) > limits.max_prompts:
        raise BadRequest(f"{len(prompts)} prompts exceed this server's limit of {limits.max_prompts}")
    return prompts


def _check_work(n: int, max_tokens: int, lengths: Sequence[int], limits: ServerLimits, what: str) -> None:
    """``n x sum(prompt tokens + max_tokens)`` for prompts of ``lengths`` within ``max_work_tokens``; ``what``
    says what the lengths are (a lower bound while text prompts are not yet tokenized)."""
    work = n * sum(length + max_tokens for length in lengths)
    if work > limits.max_work_tokens:
        raise BadRequest(
            f"{what} n x sum(prompt tokens + max_tokens) = {work} exceeds this server's limit of "
            f"{limits.max_work_tokens} tokens: send fewer prompts or samples per request"
        )


def _check_prompt_chars(prompts: list, limits: ServerLimits) -> None:
    """Every text prompt within ``max_prompt_chars`` (before it is tokenized)."""
    for k, p in enumerate(prompts):
        if isinstance(p, str) and len(p) > limits.max_prompt_chars:
            raise BadRequest(
                f"prompt {k} has {len(p)} characters, above this server's limit of {limits.max_prompt_chars}"
            )


def _prompt_tokens(k: int, prompt: str | list[int], engine: Engine) -> list[int]:
    """Prompt ``k`` as token ids (a text is tokenized): not empty, in the vocabulary, shorter than the context."""
    if isinstance(prompt, str):
        if not engine.has_tokenizer:
            raise BadRequest("text prompts need a tokenizer; this server runs in token-id mode: send token ids")
        prompt = engine.encode(prompt)
    if not prompt:
        raise BadRequest(f"prompt {k} is empty")
    bad = [t for t in prompt if not 0 <= t < engine.vocab_size]
    if bad:
        raise BadRequest(f"prompt {k}: unknown token id(s) {bad[:8]} (vocabulary size {engine.vocab_size})")
    if len(prompt) >= engine.max_model_len:
        raise BadRequest(f"prompt {k} has {len(prompt)} tokens; the model's context length is {engine.max_model_len}")
    return list(prompt)


def _check_token_ids(stop_token_ids: list[int], engine: Engine) -> None:
    bad_stop = [t for t in stop_token_ids if not 0 <= t < engine.vocab_size]
    if bad_stop:
        raise BadRequest(f"unknown stop_token_ids {bad_stop[:8]} (vocabulary size {engine.vocab_size})")


def _prompt_seeds(body: CompletionRequest, count: int) -> list[int]:
    """One seed per prompt: derived from ``seed`` (a random one when absent), or the ``seeds`` given, one each."""
    if body.seeds is None:
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        return prompt_seeds(seed, range(count))
    if body.seed is not None:
        raise BadRequest("give either seed or seeds (one per prompt), not both")
    if len(body.seeds) != count:
        raise BadRequest(f"seeds has {len(body.seeds)} entries for {count} prompts: give one per prompt")
    return list(body.seeds)


# -- the weight endpoints ----------------------------------------------------------------------------------------


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def weights_dir(root: str, path: str) -> str:
    """``path`` resolved against the weights ``root`` (both real paths); BadRequest (naming only the request's own
    path) when it or a safetensors file its index names leaves the root or the directory."""
    resolved = os.path.realpath(os.path.join(root, path))
    if not _inside(root, resolved):
        raise BadRequest(f"{path!r} lies outside this server's weights root", 403)
    index = os.path.join(resolved, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadRequest(f"{path!r}: unreadable model.safetensors.index.json ({type(exc).__name__})") from exc
    for name in files:
        if not isinstance(name, str) or not _inside(resolved, os.path.realpath(os.path.join(resolved, name))):
            raise BadRequest(f"{path!r}: safetensors file {name!r} lies outside the directory")
    return resolved


def parse_join(body: JoinRequest, weight_receivers: int) -> list[GroupSpec]:
    """The weight-update groups to join: one per pipeline stage, each with room for ``body.rank`` and the
    engine's ``weight_receivers`` ranks."""
    try:
        specs = [GroupSpec.from_dict(g) for g in body.groups]
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc
    if not specs or len({s.stage for s in specs}) != len(specs):
        raise BadRequest("groups must name each pipeline stage once")
    if any(not 1 <= body.rank <= s.world_size - weight_receivers for s in specs):
        raise BadRequest(f"rank {body.rank} does not fit the groups (this engine takes {weight_receivers})")
    return specs


def parse_update(body: UpdateRequest) -> tuple[dict[int, BucketPlan], torch.dtype]:
    """The push's bucket plans and dtype (``weight_wire``'s), else BadRequest."""
    try:
        return plan_from_wire(body.plan), parse_dtype(body.dtype)
    except ValueError as exc:
        raise BadRequest(f"bad push: {exc}") from exc
