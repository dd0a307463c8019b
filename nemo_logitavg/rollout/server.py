"""An OpenAI-style completions server that samples from pi_mix (FastAPI + uvicorn).

    python -m nemo_logitavg.rollout.server --policy DIR --reference DIR --ref-weight A \
        [--host 127.0.0.1] [--port 8000] [--config YAML] [--max-n N] [--max-tokens M] [--max-...]

Endpoints (every one behind ``Authorization: Bearer T`` when a token is set; 401 otherwise):

- ``POST /v1/completions``: the OpenAI completions protocol for what GRPO needs. ``prompt`` is a text, a list of
  texts, a list of token ids or a list of token-id lists; ``n``, ``max_tokens``, ``temperature`` (0: greedy; else
  at least ``engine.MIN_TEMPERATURE`` = 1e-3: smaller ones get a 400), ``top_p``, ``seed``, ``stop`` (string or
  list), ``logprobs`` (accepted; the log-prob of every sampled token is always returned, ``top_logprobs`` is
  null); vLLM-style extensions ``stop_token_ids`` and ``ignore_eos``.
  Choices are ordered prompt-major (``index = prompt * n + sample``); each has ``text``, ``token_ids``,
  ``logprobs`` (``tokens``, ``token_logprobs``: log pi_mix at the request temperature before top-p truncation,
  ``top_logprobs: null``, ``text_offset``) and ``finish_reason`` (``stop`` / ``length``). The response adds
  ``usage``, ``policy_step`` (the weights that produced it) and ``ref_weight``.
  Seeds (derived in ``nemo_logitavg.seeds``): prompt ``i`` of a request with seed ``s`` decodes with seed
  ``prompt_seed(s, i)``, sample ``j`` of it with its own generator (``sequence_seed``; see ``engine``), so
  completions do not depend on batching; no seed draws a random one. The extension ``seeds`` (one integer per
  prompt, instead of ``seed``) gives prompt ``i`` the seed ``seeds[i]`` itself: a client that splits one call into
  several requests sends ``prompt_seed(s, i)`` for its prompts and gets what one request with seed ``s`` would
  give.
- ``GET /health``; ``GET /v1/models`` (the served model with ``ref_weight``, ``policy_step``, ``max_model_len``,
  ``dtype`` and ``limits``: the ``ServerLimits`` a request must keep to; for the push ``server_id`` (new at each start),
  ``policy_manifest``, ``weight_receivers``, ``device`` and ``stale``).
- The collective policy push (wire format ``weight_wire``, receiving side ``weight_receiver``, sender
  ``nemo_logitavg.trainer.weight_sender`` on the trainer): ``POST /v1/weights/join`` ``{"groups": [spec per stage],
  "rank": r}`` joins the trainer's weight-update groups (answers at once; the groups form in the background);
  ``POST /v1/weights/update`` ``{"step", "run_id", "dtype", "plan", "timeout_s"}`` lands a push between requests
  (requests that arrive while a push waits for the one in progress wait behind it: weights change only
  between requests) and answers ``{"policy_step": K}`` once every bucket is in (409 when the step does not rise
  within the run id; after a failed push completions answer 503 until a complete push lands);
  ``GET /v1/weights/digest``: sha256 of every served tensor (policy and reference halves).
- ``POST /v1/load_weights`` ``{"path": DIR, "step": K, "run_id": R}``: reload the policy half from a Hugging Face
  safetensors directory between requests (requests and reloads are serialised by one lock, so no request sees
  half-loaded weights) and answer ``{"policy_step": K, "path": DIR}``. Not on the training path: the trainer
  pushes over the collective above, and no library module, recipe or launcher calls this endpoint. It is kept
  for operators (serve a saved policy, e.g. a run's ``policy_final/`` or a checkpoint exported to Hugging Face
  format, without restarting the server; ``RolloutClient.load_weights`` sends it to every server) and as the
  baseline of the push benchmark (``tests/benchmarks/bench_weight_push.py``: gather to rank 0, write the
  directory, reload). Refused (403) unless the server was started with ``--weights-root ROOT``; ``DIR`` resolves
  against ROOT (symlinks followed) and must stay inside it, as must every file the directory's safetensors index
  names (else 400). Steps rise within one run: a step not above the last one loaded for the same ``run_id`` is
  refused (409), except an exact repeat of the weights being served (same run, step and path: a no-op, so a
  retried reload succeeds); a new ``run_id`` may start from any step. A complete reload also clears the stale
  state a failed push left (completions are served again).

Errors are ``{"error": {"message", "type", "code"}}`` with a 4xx status for bad requests (bad JSON, wrong types,
unknown token ids, limits exceeded; 413 for a body over ``max_body_bytes``) and 500 for engine failures; the
server keeps serving either way. Every limit is checked before the work it bounds, and a request's parsing,
checks, tokenizing and rendering run in worker threads, not on the event loop.

A ``--config`` YAML may hold the same settings under their long names with underscores (``policy``, ``reference``,
``ref_weight``, ``host``, ``port``, ``token``, every ``ServerLimits`` field (``max_n``, ``max_tokens``,
``max_prompts``, ``max_work_tokens``, ``max_body_bytes``, ...), ``weights_root``, ``max_batch_size``, ``threads``,
``engine``, ``policy_step``, ``vllm``, ``dtype``); flags win over the file. ``engine`` is ``torch`` (default:
``TorchEngine``, CPUs and tests) or ``vllm`` (``VLLMEngine``: vLLM on GPUs, or the CPU build); ``vllm`` is a
mapping of further ``vllm.LLM`` arguments for the vLLM engine (``tensor_parallel_size``,
``gpu_memory_utilization``, ``dtype``, ``enforce_eager``, ``max_model_len``, ...). ``dtype`` sets the models'
dtype for either engine (``vllm.dtype`` wins for vLLM); ``/v1/models`` reports the dtype served. The token may
also come from the environment variable ``NEMO_LOGITAVG_ROLLOUT_TOKEN`` (keeps it out of the process list). The
server refuses to start on a port that is held. Only the ``__main__`` block parses arguments.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemo_logitavg.rollout.engine import (
    MIN_TEMPERATURE,
    Cancelled,
    Engine,
    GenerationRequest,
    SamplingParams,
)
from nemo_logitavg.rollout.process import TOKEN_ENV
from nemo_logitavg.rollout.weight_wire import GroupSpec, parse_dtype, plan_from_wire
from nemo_logitavg.seeds import prompt_seeds

logger = logging.getLogger("nemo_logitavg.rollout.server")


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

    def resolved(self, max_model_len: int) -> ServerLimits:
        """These limits with ``max_prompt_chars`` filled in for a model of context ``max_model_len``."""
        chars = self.max_prompt_chars
        if chars is None:
            chars = min(32 * max_model_len, self.max_body_bytes)
        return dataclasses.replace(self, max_prompt_chars=int(chars))
    push_timeout: float = 600.0  # seconds a policy push may take to land


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    prompt: Any  # a text, texts, token ids or lists of token ids: checked by _prompts (see _validate)
    n: StrictInt = 1
    max_tokens: StrictInt | None = 16
    temperature: StrictFloat | StrictInt | None = 1.0
    top_p: StrictFloat | StrictInt | None = 1.0
    seed: StrictInt | None = None
    seeds: list[StrictInt] | None = None  # extension: one seed per prompt (see the module docstring)
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


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def _weights_dir(root: str, path: str) -> str:
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
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def _validation_message(errors: list[dict]) -> str:
    parts = []
    for err in errors[:6]:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "JSON decode error")
            return f"invalid JSON body: {detail}"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


async def _read_body(request: Request, limit: int) -> bytes:
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


def _validate(model: type[BaseModel], raw: bytes) -> Any:
    """``raw`` JSON as ``model``; BadRequest naming the field at fault. Runs in a worker thread. A C or Rust
    parser holds the GIL for its whole call (pydantic's ``validate_json`` of an 8 MB body held the event loop for
    1.9 s here), so the only long call is ``json.loads`` of a capped body, and the big ``prompt`` field is checked
    by Python loops (``_prompts``), during which the event loop gets its turns."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_validation_message(exc.errors())) from exc


def _prompts(prompt: Any) -> list:
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


class _BearerAuth:
    """Pure ASGI middleware: every request carries ``Authorization: Bearer <token>`` or gets a 401 (a pure ASGI
    middleware passes the client's disconnect through to the endpoint, which BaseHTTPMiddleware may not)."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                reason = "missing" if not given else "wrong"
                message = f"{reason} bearer token (send 'Authorization: Bearer <token>')"
                await _error(401, message, "authentication_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    engine: Engine,
    *,
    token: str | None = None,
    limits: ServerLimits | None = None,
    model_name: str = "pi_mix",
    weights_root: str | None = None,
) -> FastAPI:
    """The ASGI app serving ``engine``. ``token``: the bearer token every endpoint requires (None: no auth).
    ``weights_root``: the directory ``/v1/load_weights`` may load from (None: that endpoint is refused)."""
    if weights_root is not None:
        weights_root = os.path.realpath(weights_root)
        if not os.path.isdir(weights_root):
            raise ValueError(f"--weights-root {weights_root} is not a directory")
    limits = (limits or ServerLimits()).resolved(engine.max_model_len)
    app = FastAPI(title="nemo_logitavg rollout server", docs_url=None, redoc_url=None, openapi_url=None)
    serve_lock = threading.Lock()  # one generate or one weight load at a time
    created = int(time.time())
    if token is not None:
        app.add_middleware(_BearerAuth, token=token)
    server_id = uuid.uuid4().hex  # per start: the trainer rebuilds its weight-update groups when it changes
    push = {"stale": False, "waiting": 0}  # a push failed or is landing: no rollouts until a complete one lands
    # Pushes waiting for the serve lock hold back requests that have not started (asynchronous GRPO keeps
    # requests coming while a push arrives): weights land after the request in progress, not after a queue.
    push_gate = threading.Condition()

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return _error(400, _validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(BadRequest)
    async def on_bad(request: Request, exc: BadRequest):
        return _error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        # The message stays in the server's log: exception texts reveal paths and internals to the caller.
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal server error (the server's log has the details)", "server_error")

    def model_card() -> dict:
        info = engine.info()
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "nemo_logitavg",
            "ref_weight": engine.ref_weight,
            "policy_step": engine.policy_step,
            "max_model_len": engine.max_model_len,
            "engine": info.get("engine"),
            "limits": dataclasses.asdict(limits),
            "server_id": server_id,
            "policy_manifest": engine.policy_manifest,
            "weight_receivers": engine.weight_receivers,
            "device": _device_info(engine),
            "stale": push["stale"],
            "dtype": info.get("dtype"),  # the trainer refuses a server whose dtype differs from its own
        }

    @app.get("/health")
    async def health():
        # pid: lets whoever started this process check that it is the one answering on the port.
        state = {"policy_step": engine.policy_step, "ref_weight": engine.ref_weight, "pid": os.getpid()}
        if not engine.alive():
            return JSONResponse(status_code=503, content={"status": "engine dead", **state})
        return {"status": "ok", **state}

    @app.get("/v1/models")
    async def models():
        card = model_card()
        return {
            "object": "list",
            "data": [card],
            "ref_weight": card["ref_weight"],
            "policy_step": card["policy_step"],
            "limits": card["limits"],
        }

    loaded_steps: dict[str, int] = {}  # run_id -> the last step loaded for it (newest runs kept)

    @app.post("/v1/load_weights")
    async def load_weights(request: Request):
        if weights_root is None:
            raise BadRequest("this server loads no weights by path: start it with --weights-root DIR", 403)
        raw = await _read_body(request, 1 << 16)

        def load() -> tuple[int, str]:
            body = _validate(LoadWeightsRequest, raw)
            path = _weights_dir(weights_root, body.path)
            with serve_lock:
                last = loaded_steps.get(body.run_id)
                repeat = last == body.step == engine.policy_step and engine.info().get("policy_path") == path
                if last is not None and body.step <= last and not repeat:
                    raise BadRequest(f"step {body.step} is not above step {last}, loaded for run {body.run_id!r}", 409)
                if not repeat:
                    try:
                        engine.load_policy(path, body.step)
                        push["stale"] = False  # a whole policy landed
                    except (FileNotFoundError, ValueError) as exc:
                        raise BadRequest(f"cannot load policy weights from {body.path!r}: {exc}") from exc
                loaded_steps.pop(body.run_id, None)
                loaded_steps[body.run_id] = body.step
                while len(loaded_steps) > 64:
                    loaded_steps.pop(next(iter(loaded_steps)))
                return engine.policy_step, body.path

        step, path = await run_in_threadpool(load)
        return {"policy_step": step, "path": path}

    @app.get("/v1/weights/digest")
    async def weights_digest():
        def digests() -> dict:
            with serve_lock:
                return {"policy_step": engine.policy_step, **engine.weight_digests()}

        return await run_in_threadpool(digests)

    @app.post("/v1/weights/join")
    async def weights_join(body: JoinRequest):
        try:
            specs = [GroupSpec.from_dict(g) for g in body.groups]
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        if not specs or len({s.stage for s in specs}) != len(specs):
            raise BadRequest("groups must name each pipeline stage once")
        if any(not 1 <= body.rank <= s.world_size - engine.weight_receivers for s in specs):
            raise BadRequest(f"rank {body.rank} does not fit the groups (this engine takes {engine.weight_receivers})")
        engine.join_weight_groups(specs, body.rank)
        return {"joined": specs[0].name, "rank": body.rank}

    @app.post("/v1/weights/update")
    async def weights_update(body: UpdateRequest):
        try:
            plans, dtype = plan_from_wire(body.plan), parse_dtype(body.dtype)
        except ValueError as exc:
            raise BadRequest(f"bad push: {exc}") from exc
        last = loaded_steps.get(body.run_id)
        if last is not None and body.step <= last:
            raise BadRequest(f"step {body.step} does not rise above this run's last pushed step {last}", 409)

        def land() -> int:
            with push_gate:
                push["waiting"] += 1
            try:
                with serve_lock:  # between requests: no completion ever mixes two policies
                    push["stale"] = True
                    timeout = min(float(body.timeout_s or limits.push_timeout), limits.push_timeout)
                    engine.receive_policy(plans, dtype, body.step, timeout_s=timeout)
                    push["stale"] = False
                    loaded_steps.pop(body.run_id, None)
                    loaded_steps[body.run_id] = body.step
                    return engine.policy_step
            finally:
                with push_gate:
                    push["waiting"] -= 1
                    push_gate.notify_all()

        try:
            step = await run_in_threadpool(land)
        except ValueError as exc:
            raise BadRequest(f"bad push: {exc}") from exc
        except Exception as exc:
            print(f"nemo_logitavg rollout server: policy push failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return _error(500, "the policy push failed; no rollouts until a complete push lands", "server_error")
        return {"policy_step": step}

    @app.post("/v1/completions")
    async def completions(request: Request):
        # Only reading the (capped) body happens on the event loop; parsing, checks, tokenizing, decoding and
        # rendering the response run in worker threads, so /health keeps answering during a large request.
        raw = await _read_body(request, limits.max_body_bytes)

        cancel = threading.Event()

        def prepare() -> tuple[CompletionRequest, list[list[int]], int, list[GenerationRequest]]:
            body = _validate(CompletionRequest, raw)
            prompts, params, n, seeds = _parse_completion(body, engine, limits)
            requests = [
                GenerationRequest(p, params, n=n, seed=seed, cancel=cancel)
                for p, seed in zip(prompts, seeds, strict=True)
            ]
            return body, prompts, n, requests

        body, prompts, n, requests = await run_in_threadpool(prepare)

        def run():
            with push_gate:  # a push that arrived first lands first
                push_gate.wait_for(lambda: push["waiting"] == 0)
            with serve_lock:
                if cancel.is_set():  # dropped while it waited for the lock
                    raise Cancelled("the request was cancelled")
                if push["stale"]:  # checked under the lock: a push may have failed while this request waited
                    return None, None
                return engine.generate(requests), engine.policy_step

        task = asyncio.ensure_future(run_in_threadpool(run))
        # A client that disconnects cancels the rest of its decoding (the torch engine checks between steps),
        # so the next request does not wait behind work nobody will read.
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                cancel.set()
        try:
            outputs, step = await task
        except Cancelled:
            return Response(status_code=499)  # nobody reads it
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        if outputs is None:
            return _error(503, "this server missed a policy push; no rollouts until a complete push lands", "stale")
        content = await run_in_threadpool(_render, engine, body.model or model_name, prompts, n, outputs, step)
        return Response(content, media_type="application/json")

    return app


def _render(engine: Engine, model: str, prompts: list[list[int]], n: int, outputs, step: int) -> bytes:
    """The completions response as JSON bytes (in a worker thread: a large response takes a while)."""
    choices = []
    completion_tokens = 0
    for i, group in enumerate(outputs):
        for j, out in enumerate(group):
            completion_tokens += len(out.token_ids)
            tokens = engine.token_strings(out.token_ids)
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            choices.append(
                {
                    "index": i * n + j,
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "logprobs": {
                        "tokens": tokens,
                        "token_logprobs": out.logprobs,
                        "top_logprobs": None,
                        "text_offset": offsets,
                    },
                    "finish_reason": out.finish_reason,
                }
            )
    prompt_tokens = sum(len(p) for p in prompts) * n
    payload = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "policy_step": step,
        "ref_weight": engine.ref_weight,
    }
    return json.dumps(payload, separators=(",", ":")).encode()
def _device_info(engine: Engine) -> dict:
    """Where the engine's weights live: the trainer picks NCCL only between GPUs that are not the same one."""
    import torch

    device = torch.device(getattr(engine, "device", "cpu"))
    uuid_ = None
    if device.type == "cuda":
        uuid_ = str(torch.cuda.get_device_properties(device).uuid)
    return {"type": device.type, "gpu_uuid": uuid_}


def _parse_completion(body: CompletionRequest, engine: Engine, limits: ServerLimits):
    """The request's prompts (token ids), sampling parameters, n and per-prompt seeds; BadRequest naming the first
    limit exceeded. Cheap checks come first: nothing is tokenized before the sizes are known to fit."""
    if body.stream:
        raise BadRequest("stream=true is not supported by this server")
    if body.echo:
        raise BadRequest("echo=true is not supported by this server")
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
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > limits.max_stop:
        raise BadRequest(f"at most {limits.max_stop} stop strings, got {len(stop)}")
    long_stop = [k for k, text in enumerate(stop) if len(text) > limits.max_stop_chars]
    if long_stop:
        raise BadRequest(f"stop string {long_stop[0]} is longer than this server's limit of {limits.max_stop_chars}")
    if stop and not engine.has_tokenizer:
        raise BadRequest("stop strings need a tokenizer; this server runs in token-id mode (no tokenizer files)")
    stop_token_ids = body.stop_token_ids or []
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise BadRequest(f"at most {limits.max_stop_token_ids} stop_token_ids, got {len(stop_token_ids)}")

    prompts_raw = _prompts(body.prompt)
    if not prompts_raw:
        raise BadRequest("prompt is empty")
    if len(prompts_raw) > limits.max_prompts:
        raise BadRequest(f"{len(prompts_raw)} prompts exceed this server's limit of {limits.max_prompts}")
    n = body.n

    def work(lengths) -> int:
        return n * sum(length + max_tokens for length in lengths)

    def check_work(lengths, what: str) -> None:
        if work(lengths) > limits.max_work_tokens:
            raise BadRequest(
                f"{what} n x sum(prompt tokens + max_tokens) = {work(lengths)} exceeds this server's limit of "
                f"{limits.max_work_tokens} tokens: send fewer prompts or samples per request"
            )

    check_work([0] * len(prompts_raw), "even with empty prompts,")
    for k, p in enumerate(prompts_raw):
        if isinstance(p, str) and len(p) > limits.max_prompt_chars:
            raise BadRequest(
                f"prompt {k} has {len(p)} characters, above this server's limit of {limits.max_prompt_chars}"
            )
    check_work([0 if isinstance(p, str) else len(p) for p in prompts_raw], "before tokenizing the text prompts,")
    prompts: list[list[int]] = []
    for k, p in enumerate(prompts_raw):
        if isinstance(p, str):
            if not engine.has_tokenizer:
                raise BadRequest("text prompts need a tokenizer; this server runs in token-id mode: send token ids")
            p = engine.encode(p)
        if not p:
            raise BadRequest(f"prompt {k} is empty")
        bad = [t for t in p if not 0 <= t < engine.vocab_size]
        if bad:
            raise BadRequest(f"prompt {k}: unknown token id(s) {bad[:8]} (vocabulary size {engine.vocab_size})")
        if len(p) >= engine.max_model_len:
            raise BadRequest(f"prompt {k} has {len(p)} tokens; the model's context length is {engine.max_model_len}")
        prompts.append(list(p))
    check_work([len(p) for p in prompts], "")
    bad_stop = [t for t in stop_token_ids if not 0 <= t < engine.vocab_size]
    if bad_stop:
        raise BadRequest(f"unknown stop_token_ids {bad_stop[:8]} (vocabulary size {engine.vocab_size})")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        stop_token_ids=tuple(stop_token_ids),
        ignore_eos=body.ignore_eos,
    )
    if body.seeds is None:
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        seeds = prompt_seeds(seed, range(len(prompts)))
    elif body.seed is not None:
        raise BadRequest("give either seed or seeds (one per prompt), not both")
    elif len(body.seeds) != len(prompts):
        raise BadRequest(f"seeds has {len(body.seeds)} entries for {len(prompts)} prompts: give one per prompt")
    else:
        seeds = list(body.seeds)
    return prompts, params, n, seeds


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or SystemExit with a clear message when the port is held."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does; a live listener still blocks
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"nemo_logitavg.rollout.server: cannot listen on {host}:{port}: {exc.strerror or exc} "
            "(is another server running there? choose another --port)"
        ) from exc
    sock.set_inheritable(True)
    return sock


def serve(
    engine: Engine,
    sock: socket.socket,
    token: str | None,
    limits: ServerLimits,
    log_level: str = "warning",
    weights_root: str | None = None,
):
    """Serve ``engine`` on the listening socket ``sock`` (bound once, before the models were loaded)."""
    import uvicorn

    host = sock.getsockname()[0]
    app = create_app(engine, token=token, limits=limits, weights_root=weights_root)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5)
    actual_port = sock.getsockname()[1]
    print(
        f"nemo_logitavg rollout server: pi_mix with ref_weight={engine.ref_weight}, policy step "
        f"{engine.policy_step}, listening on http://{host}:{actual_port}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    import argparse

    import torch
    import yaml

    parser = argparse.ArgumentParser(description="Serve pi_mix (logit average of policy and reference)")
    parser.add_argument("--config", help="YAML with any of the settings below (flags win)")
    parser.add_argument("--policy", help="Hugging Face directory of the policy")
    parser.add_argument("--reference", help="Hugging Face directory of the reference")
    parser.add_argument("--ref-weight", type=float, help="reference weight a in [0, 1]")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--token", help=f"bearer token required on every endpoint (visible in ps: prefer {TOKEN_ENV})")
    limit_names = [f.name for f in dataclasses.fields(ServerLimits)]
    for name in limit_names:  # --max-n, --max-tokens, --max-prompts, --max-work-tokens, --max-body-bytes, ...
        default = getattr(ServerLimits, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"request limit (default {default})")
    parser.add_argument("--max-batch-size", type=int, help="sequences decoded together (default 256)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--weights-root", help="directory /v1/load_weights may load from (default: refused)")
    parser.add_argument("--policy-step", type=int, help="step of the initial policy weights (default 0)")
    parser.add_argument("--engine", choices=["torch", "vllm"], help="torch (default) or vllm")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="the models' dtype (default: torch float32, vLLM auto; vllm.dtype wins)")
    parser.add_argument("--device", help="the torch engine's device, e.g. cuda:0 (default cpu)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()

    settings: dict = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            parser.error(f"{args.config} must hold a mapping of settings")
        settings.update(loaded.get("rollout_server", loaded))
    for key, value in vars(args).items():
        if value is not None and key not in ("config", "log_level"):
            settings[key] = value
    settings.setdefault("token", os.environ.get(TOKEN_ENV) or None)
    known = {
        "policy", "reference", "ref_weight", "host", "port", "token", "max_batch_size", "threads", "policy_step",
        "engine", "vllm", "weights_root", "dtype", "device", *limit_names,
    }  # fmt: skip
    unknown = sorted(set(settings) - known)
    if unknown:
        parser.error(f"unknown settings {unknown}")
    for required in ("policy", "ref_weight"):
        if settings.get(required) is None:
            parser.error(f"--{required.replace('_', '-')} is required (flag or config)")
    engine_name = settings.get("engine") or "torch"
    if engine_name not in ("torch", "vllm"):
        parser.error(f"engine {engine_name!r} is unknown: choose 'torch' or 'vllm'")
    if settings.get("dtype") not in (None, "float32", "bfloat16", "float16"):
        parser.error(f"dtype {settings['dtype']!r} is unknown: choose float32, bfloat16 or float16")
    vllm_args = settings.get("vllm") or {}
    if not isinstance(vllm_args, dict):
        parser.error("the vllm setting must be a mapping of vllm.LLM arguments")
    if vllm_args and engine_name != "vllm":
        parser.error("vllm settings were given but the engine is not vllm (set engine: vllm)")
    if settings.get("device") and engine_name != "torch":
        parser.error("--device is the torch engine's (vLLM places its workers itself)")
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))

    if settings.get("weights_root") and not os.path.isdir(settings["weights_root"]):
        parser.error(f"--weights-root {settings['weights_root']} is not a directory")
    host = settings.get("host", "127.0.0.1")
    port = int(settings.get("port", 8000))
    # Bound once, before loading the models: a held port fails fast, and nobody can take it while they load.
    listening = bind_socket(host, port)

    engine_kwargs = {
        "max_batch_size": int(settings.get("max_batch_size", 256)),
        "policy_step": int(settings.get("policy_step", 0)),
    }
    if engine_name == "vllm":
        from nemo_logitavg.rollout.vllm_engine import VLLMEngine as engine_class

        engine_kwargs["engine_args"] = dict(vllm_args)
        if settings.get("dtype"):
            engine_kwargs["dtype"] = settings["dtype"]
    else:
        from nemo_logitavg.rollout.engine import TorchEngine as engine_class

        if settings.get("dtype"):
            engine_kwargs["dtype"] = getattr(torch, settings["dtype"])
        engine_kwargs["device"] = settings.get("device") or "cpu"
    served_engine = engine_class(
        settings["policy"], settings.get("reference"), float(settings["ref_weight"]), **engine_kwargs
    )
    server_limits = ServerLimits(**{name: int(settings[name]) for name in limit_names if name in settings})
    if hasattr(served_engine, "close"):  # the vLLM engine has processes of its own to stop on the way out
        import signal

        # uvicorn re-raises SIGTERM after its graceful shutdown; as an exception it lets the finally below run.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        serve(
            served_engine, listening, settings.get("token"), server_limits, log_level=args.log_level,
            weights_root=settings.get("weights_root"),
        )  # fmt: skip
    finally:
        if hasattr(served_engine, "close"):
            served_engine.close()
