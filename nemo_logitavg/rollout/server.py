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
server refuses to start on a port that is held. Only ``main`` (the ``__main__`` entry) parses arguments.

Where things are: this module holds the app (``create_app``: its shared state and locks, then its routes by group),
``serve`` and the command line; ``requests`` the request schemas, ``ServerLimits`` and every check of a request;
``responses`` the error body and the completions response.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemo_logitavg.rollout.engine import Cancelled, Engine, GeneratedSequence, GenerationRequest, TorchEngine
from nemo_logitavg.rollout.process import TOKEN_ENV
from nemo_logitavg.rollout.requests import (
    BadRequest,
    CompletionRequest,
    JoinRequest,
    LoadWeightsRequest,
    ServerLimits,
    UpdateRequest,
    parse_completion,
    parse_join,
    parse_update,
    read_body,
    validate,
    validation_message,
    weights_dir,
)
from nemo_logitavg.rollout.responses import device_info, error_response, render_completions
from nemo_logitavg.rollout.vllm_engine import VLLMEngine  # imports vLLM itself only when an engine is built

logger = logging.getLogger("nemo_logitavg.rollout.server")

__all__ = ["ServerLimits", "bind_socket", "create_app", "main", "serve"]


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
                await error_response(401, message, "authentication_error")(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass(eq=False)
class _ServerState:
    """What the endpoints share, and the work they hand to worker threads.

    Weights change only between requests: one generate or one weight load holds ``serve_lock`` at a time. Pushes
    waiting for the lock (``waiting``, under ``push_gate``) hold back requests that have not started (asynchronous
    GRPO keeps requests coming while a push arrives), so weights land after the request in progress, not after a
    queue. ``stale``: a push failed or is landing; no rollouts until a complete one lands.
    """

    engine: Engine
    limits: ServerLimits
    model_name: str
    weights_root: str | None
    created: int = field(default_factory=lambda: int(time.time()))
    # Per start: the trainer rebuilds its weight-update groups when it changes.
    server_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    serve_lock: threading.Lock = field(default_factory=threading.Lock)
    push_gate: threading.Condition = field(default_factory=threading.Condition)
    stale: bool = False
    waiting: int = 0
    loaded_steps: dict[str, int] = field(default_factory=dict)  # run_id -> the last step loaded (newest runs kept)

    def model_card(self) -> dict:
        engine = self.engine
        info = engine.info()
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "nemo_logitavg",
            "ref_weight": engine.ref_weight,
            "policy_step": engine.policy_step,
            "max_model_len": engine.max_model_len,
            "engine": info.get("engine"),
            "limits": dataclasses.asdict(self.limits),
            "server_id": self.server_id,
            "policy_manifest": engine.policy_manifest,
            "weight_receivers": engine.weight_receivers,
            "device": device_info(engine),
            "stale": self.stale,
            "dtype": info.get("dtype"),  # the trainer refuses a server whose dtype differs from its own
        }

    def load_weights(self, raw: bytes) -> tuple[int, str]:
        """``POST /v1/load_weights``: the policy half reloaded from a directory under the weights root, between
        requests; the served step and the request's path."""
        body = validate(LoadWeightsRequest, raw)
        path = weights_dir(self.weights_root, body.path)
        engine = self.engine
        with self.serve_lock:
            last = self.loaded_steps.get(body.run_id)
            repeat = last == body.step == engine.policy_step and engine.info().get("policy_path") == path
            if last is not None and body.step <= last and not repeat:
                raise BadRequest(f"step {body.step} is not above step {last}, loaded for run {body.run_id!r}", 409)
            if not repeat:
                try:
                    engine.load_policy(path, body.step)
                    self.stale = False  # a whole policy landed
                except (FileNotFoundError, ValueError) as exc:
                    raise BadRequest(f"cannot load policy weights from {body.path!r}: {exc}") from exc
            self.loaded_steps.pop(body.run_id, None)
            self.loaded_steps[body.run_id] = body.step
            while len(self.loaded_steps) > 64:
                self.loaded_steps.pop(next(iter(self.loaded_steps)))
            return engine.policy_step, body.path

    def digests(self) -> dict:
        """``GET /v1/weights/digest``: the served step and the sha256 of every served tensor."""
        with self.serve_lock:
            return {"policy_step": self.engine.policy_step, **self.engine.weight_digests()}

    def check_push_step(self, body: UpdateRequest) -> None:
        """A push's step rises above the last one pushed or loaded for its run (409 otherwise)."""
        last = self.loaded_steps.get(body.run_id)
        if last is not None and body.step <= last:
            raise BadRequest(f"step {body.step} does not rise above this run's last pushed step {last}", 409)

    def land_push(self, body: UpdateRequest, plans: dict, dtype: torch.dtype) -> int:
        """``POST /v1/weights/update``: receive the pushed policy between requests; the step now served."""
        with self.push_gate:
            self.waiting += 1
        try:
            with self.serve_lock:  # between requests: no completion ever mixes two policies
                self.stale = True
                timeout = min(float(body.timeout_s or self.limits.push_timeout), self.limits.push_timeout)
                self.engine.receive_policy(plans, dtype, body.step, timeout_s=timeout)
                self.stale = False
                self.loaded_steps.pop(body.run_id, None)
                self.loaded_steps[body.run_id] = body.step
                return self.engine.policy_step
        finally:
            with self.push_gate:
                self.waiting -= 1
                self.push_gate.notify_all()

    def prepare(
        self, raw: bytes, cancel: threading.Event
    ) -> tuple[CompletionRequest, list[list[int]], int, list[GenerationRequest]]:
        """A completion request's body, prompts, n and the engine's requests (checked, tokenized)."""
        body = validate(CompletionRequest, raw)
        prompts, params, n, seeds = parse_completion(body, self.engine, self.limits)
        requests = [
            GenerationRequest(p, params, n=n, seed=seed, cancel=cancel) for p, seed in zip(prompts, seeds, strict=True)
        ]
        return body, prompts, n, requests

    def generate(
        self, requests: list[GenerationRequest], cancel: threading.Event
    ) -> tuple[list[list[GeneratedSequence]] | None, int | None]:
        """The completions and the policy step that made them, between pushes; (None, None) while stale."""
        with self.push_gate:  # a push that arrived first lands first
            self.push_gate.wait_for(lambda: self.waiting == 0)
        with self.serve_lock:
            if cancel.is_set():  # dropped while it waited for the lock
                raise Cancelled("the request was cancelled")
            if self.stale:  # checked under the lock: a push may have failed while this request waited
                return None, None
            return self.engine.generate(requests), self.engine.policy_step


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
    state = _ServerState(engine, limits, model_name, weights_root)
    if token is not None:
        app.add_middleware(_BearerAuth, token=token)
    _add_error_handlers(app)
    _add_status_routes(app, state)
    _add_weight_routes(app, state)
    _add_completions_route(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": {...}}``: 4xx for bad requests, 500 (details only in the log) for failures."""

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return error_response(400, validation_message(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(BadRequest)
    async def on_bad(request: Request, exc: BadRequest):
        return error_response(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        # The message stays in the server's log: exception texts reveal paths and internals to the caller.
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error (the server's log has the details)", "server_error")


def _add_status_routes(app: FastAPI, state: _ServerState) -> None:
    """``GET /health`` and ``GET /v1/models``."""
    engine = state.engine

    @app.get("/health")
    async def health():
        # pid: lets whoever started this process check that it is the one answering on the port.
        status = {"policy_step": engine.policy_step, "ref_weight": engine.ref_weight, "pid": os.getpid()}
        if not engine.alive():
            return JSONResponse(status_code=503, content={"status": "engine dead", **status})
        return {"status": "ok", **status}

    @app.get("/v1/models")
    async def models():
        card = state.model_card()
        return {
            "object": "list",
            "data": [card],
            "ref_weight": card["ref_weight"],
            "policy_step": card["policy_step"],
            "limits": card["limits"],
        }


def _add_weight_routes(app: FastAPI, state: _ServerState) -> None:
    """The policy's weights: reload by path, digest, and the collective push (join, update)."""

    @app.post("/v1/load_weights")
    async def load_weights(request: Request):
        if state.weights_root is None:
            raise BadRequest("this server loads no weights by path: start it with --weights-root DIR", 403)
        raw = await read_body(request, 1 << 16)
        step, path = await run_in_threadpool(state.load_weights, raw)
        return {"policy_step": step, "path": path}

    @app.get("/v1/weights/digest")
    async def weights_digest():
        return await run_in_threadpool(state.digests)

    @app.post("/v1/weights/join")
    async def weights_join(body: JoinRequest):
        specs = parse_join(body, state.engine.weight_receivers)
        state.engine.join_weight_groups(specs, body.rank)
        return {"joined": specs[0].name, "rank": body.rank}

    @app.post("/v1/weights/update")
    async def weights_update(body: UpdateRequest):
        plans, dtype = parse_update(body)
        state.check_push_step(body)
        try:
            step = await run_in_threadpool(state.land_push, body, plans, dtype)
        except ValueError as exc:
            raise BadRequest(f"bad push: {exc}") from exc
        except Exception as exc:
            print(f"nemo_logitavg rollout server: policy push failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            message = "the policy push failed; no rollouts until a complete push lands"
            return error_response(500, message, "server_error")
        return {"policy_step": step}


def _add_completions_route(app: FastAPI, state: _ServerState) -> None:
    """``POST /v1/completions``. Only reading the (capped) body happens on the event loop; parsing, checks,
    tokenizing, decoding and rendering the response run in worker threads, so /health keeps answering during a
    large request."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, state.limits.max_body_bytes)
        cancel = threading.Event()
        body, prompts, n, requests = await run_in_threadpool(state.prepare, raw, cancel)
        task = asyncio.ensure_future(run_in_threadpool(state.generate, requests, cancel))
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
            return error_response(
                503, "this server missed a policy push; no rollouts until a complete push lands", "stale"
            )
        model = body.model or state.model_name
        content = await run_in_threadpool(render_completions, state.engine, model, prompts, n, outputs, step)
        return Response(content, media_type="application/json")


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
) -> None:
    """Serve ``engine`` on the listening socket ``sock`` (bound once, before the models were loaded)."""
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


# -- the command line (``python -m nemo_logitavg.rollout.server``) ------------------------------------------------

_LIMIT_NAMES = [f.name for f in dataclasses.fields(ServerLimits)]
_KNOWN_SETTINGS = {
    "policy", "reference", "ref_weight", "host", "port", "token", "max_batch_size", "threads", "policy_step",
    "engine", "vllm", "weights_root", "dtype", "device", *_LIMIT_NAMES,
}  # fmt: skip
_DTYPES = ("float32", "bfloat16", "float16")


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Serve pi_mix (logit average of policy and reference)")
    parser.add_argument("--config", help="YAML with any of the settings below (flags win)")
    parser.add_argument("--policy", help="Hugging Face directory of the policy")
    parser.add_argument("--reference", help="Hugging Face directory of the reference")
    parser.add_argument("--ref-weight", type=float, help="reference weight a in [0, 1]")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--token", help=f"bearer token required on every endpoint (visible in ps: prefer {TOKEN_ENV})")
    for name in _LIMIT_NAMES:  # --max-n, --max-tokens, --max-prompts, --max-work-tokens, --max-body-bytes, ...
        default = getattr(ServerLimits, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"request limit (default {default})")
    parser.add_argument("--max-batch-size", type=int, help="sequences decoded together (default 256)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--weights-root", help="directory /v1/load_weights may load from (default: refused)")
    parser.add_argument("--policy-step", type=int, help="step of the initial policy weights (default 0)")
    parser.add_argument("--engine", choices=["torch", "vllm"], help="torch (default) or vllm")
    parser.add_argument("--dtype", choices=list(_DTYPES),
                        help="the models' dtype (default: torch float32, vLLM auto; vllm.dtype wins)")  # fmt: skip
    parser.add_argument("--device", help="the torch engine's device, e.g. cuda:0 (default cpu)")
    parser.add_argument("--log-level", default="warning")
    return parser


def _settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """The ``--config`` file's settings (or its ``rollout_server`` section) with the flags given over them and the
    token from the environment when none is set; parser errors for unknown or missing ones."""
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
    unknown = sorted(set(settings) - _KNOWN_SETTINGS)
    if unknown:
        parser.error(f"unknown settings {unknown}")
    for required in ("policy", "ref_weight"):
        if settings.get(required) is None:
            parser.error(f"--{required.replace('_', '-')} is required (flag or config)")
    return settings


def _check_engine_settings(settings: dict, parser: argparse.ArgumentParser) -> str:
    """The engine's name, after the settings that belong to one engine are checked against it."""
    engine_name = settings.get("engine") or "torch"
    if engine_name not in ("torch", "vllm"):
        parser.error(f"engine {engine_name!r} is unknown: choose 'torch' or 'vllm'")
    if settings.get("dtype") not in (None, *_DTYPES):
        parser.error(f"dtype {settings['dtype']!r} is unknown: choose float32, bfloat16 or float16")
    vllm_args = settings.get("vllm") or {}
    if not isinstance(vllm_args, dict):
        parser.error("the vllm setting must be a mapping of vllm.LLM arguments")
    if vllm_args and engine_name != "vllm":
        parser.error("vllm settings were given but the engine is not vllm (set engine: vllm)")
    if settings.get("device") and engine_name != "torch":
        parser.error("--device is the torch engine's (vLLM places its workers itself)")
    return engine_name


def _build_engine(settings: dict, engine_name: str) -> Engine:
    """The engine the settings describe, with its models loaded."""
    engine_kwargs = {
        "max_batch_size": int(settings.get("max_batch_size", 256)),
        "policy_step": int(settings.get("policy_step", 0)),
    }
    if engine_name == "vllm":
        engine_class = VLLMEngine
        engine_kwargs["engine_args"] = dict(settings.get("vllm") or {})
        if settings.get("dtype"):
            engine_kwargs["dtype"] = settings["dtype"]
    else:
        engine_class = TorchEngine
        if settings.get("dtype"):
            engine_kwargs["dtype"] = getattr(torch, settings["dtype"])
        engine_kwargs["device"] = settings.get("device") or "cpu"
    return engine_class(settings["policy"], settings.get("reference"), float(settings["ref_weight"]), **engine_kwargs)


def main(argv: list[str] | None = None) -> None:
    """``python -m nemo_logitavg.rollout.server``: parse the flags (and ``--config``), bind the port, load the
    models and serve until stopped."""
    parser = _arg_parser()
    args = parser.parse_args(argv)
    settings = _settings(args, parser)
    engine_name = _check_engine_settings(settings, parser)
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    if settings.get("weights_root") and not os.path.isdir(settings["weights_root"]):
        parser.error(f"--weights-root {settings['weights_root']} is not a directory")
    host = settings.get("host", "127.0.0.1")
    port = int(settings.get("port", 8000))
    # Bound once, before loading the models: a held port fails fast, and nobody can take it while they load.
    listening = bind_socket(host, port)
    served_engine = _build_engine(settings, engine_name)
    server_limits = ServerLimits(**{name: int(settings[name]) for name in _LIMIT_NAMES if name in settings})
    if hasattr(served_engine, "close"):  # the vLLM engine has processes of its own to stop on the way out
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


if __name__ == "__main__":
    main()
