"""An OpenAI-style completions server that samples from pi_mix (FastAPI + uvicorn).

    python -m nemo_logitavg.rollout.server --policy DIR --reference DIR --ref-weight A \
        [--host 127.0.0.1] [--port 8000] [--config YAML] [--token T] [--max-n N] [--max-tokens M]

Endpoints (every one behind ``Authorization: Bearer T`` when a token is set; 401 otherwise):

- ``POST /v1/completions``: the OpenAI completions protocol for what GRPO needs. ``prompt`` is a text, a list of
  texts, a list of token ids or a list of token-id lists; ``n``, ``max_tokens``, ``temperature`` (0: greedy),
  ``top_p``, ``seed``, ``stop`` (string or list), ``logprobs`` (accepted; the log-prob of every sampled token is
  always returned, ``top_logprobs`` is null); vLLM-style extensions ``stop_token_ids`` and ``ignore_eos``.
  Choices are ordered prompt-major (``index = prompt * n + sample``); each has ``text``, ``token_ids``,
  ``logprobs`` (``tokens``, ``token_logprobs``: log pi_mix at the request temperature before top-p truncation,
  ``top_logprobs: null``, ``text_offset``) and ``finish_reason`` (``stop`` / ``length``). The response adds
  ``usage``, ``policy_step`` (the weights that produced it) and ``ref_weight``.
  Seeds: prompt ``i`` of a request with seed ``s`` decodes with seed ``derive_seed(s, i)``, sample ``j`` of it with
  its own generator (see ``engine``), so completions do not depend on batching; no seed draws a random one.
  The extension ``seeds`` (one integer per prompt, instead of ``seed``) gives prompt ``i`` the seed ``seeds[i]``
  itself: a client that splits one call into several requests sends ``derive_seed(s, i)`` for its prompts and
  gets what one request with seed ``s`` would give.
- ``GET /health``; ``GET /v1/models`` (the served model with ``ref_weight``, ``policy_step``, ``max_model_len``).
- ``POST /v1/load_weights`` ``{"path": DIR, "step": K}``: reload the policy half from a Hugging Face safetensors
  directory between requests (requests and reloads are serialised by one lock, so no request sees half-loaded
  weights) and answer ``{"policy_step": K}``.

Errors are ``{"error": {"message", "type", "code"}}`` with a 4xx status for bad requests (bad JSON, wrong types,
unknown token ids, limits exceeded) and 500 for engine failures; the server keeps serving either way.

A ``--config`` YAML may hold the same settings under their long names with underscores (``policy``,
``reference``, ``ref_weight``, ``host``, ``port``, ``token``, ``max_n``, ``max_tokens``, ``max_prompts``,
``max_batch_size``, ``threads``, ``engine``, ``policy_step``, ``vllm``); flags win over the file. ``engine`` is
``torch`` (default: ``TorchEngine``, CPUs and tests) or ``vllm`` (``VLLMEngine``: vLLM on GPUs, or the CPU build);
``vllm`` is a mapping of further ``vllm.LLM`` arguments for the vLLM engine (``tensor_parallel_size``,
``gpu_memory_utilization``, ``dtype``, ``enforce_eager``, ``max_model_len``, ...). The token may also come
from the environment variable ``NEMO_LOGITAVG_ROLLOUT_TOKEN`` (keeps it out of the process list). The server
refuses to start on a port that is held. Only the ``__main__`` block parses arguments.
"""

from __future__ import annotations

import hmac
import math
import secrets
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Union

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemo_logitavg.rollout.engine import Engine, GenerationRequest, SamplingParams, derive_seed

TOKEN_ENV = "NEMO_LOGITAVG_ROLLOUT_TOKEN"


@dataclass
class ServerLimits:
    max_n: int = 64
    max_tokens: int = 4096
    max_prompts: int = 512
    max_stop: int = 16


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]  # noqa: UP007
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


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:6]:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "JSON decode error")
            return f"invalid JSON body: {detail} (at character {err.get('loc', ('', '?'))[-1]})"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def create_app(
    engine: Engine, *, token: str | None = None, limits: ServerLimits | None = None, model_name: str = "pi_mix"
) -> FastAPI:
    """The ASGI app serving ``engine``. ``token``: the bearer token every endpoint requires (None: no auth)."""
    limits = limits or ServerLimits()
    app = FastAPI(title="nemo_logitavg rollout server", docs_url=None, redoc_url=None, openapi_url=None)
    serve_lock = threading.Lock()  # one generate or one weight load at a time
    created = int(time.time())

    @app.middleware("http")
    async def bearer_auth(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                reason = "missing" if not given else "wrong"
                message = f"{reason} bearer token (send 'Authorization: Bearer <token>')"
                return _error(401, message, "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return _error(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(BadRequest)
    async def on_bad(request: Request, exc: BadRequest):
        return _error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")

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
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "policy_step": engine.policy_step, "ref_weight": engine.ref_weight}

    @app.get("/v1/models")
    async def models():
        card = model_card()
        return {"object": "list", "data": [card], "ref_weight": card["ref_weight"], "policy_step": card["policy_step"]}

    @app.post("/v1/load_weights")
    async def load_weights(body: LoadWeightsRequest):
        def load() -> int:
            with serve_lock:
                engine.load_policy(body.path, body.step)
                return engine.policy_step

        try:
            step = await run_in_threadpool(load)
        except (FileNotFoundError, ValueError) as exc:
            raise BadRequest(f"cannot load policy weights from {body.path!r}: {exc}") from exc
        return {"policy_step": step, "path": body.path}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts, params, n, seeds = _parse_completion(body, engine, limits)
        requests = [
            GenerationRequest(prompt, params, n=n, seed=seed) for prompt, seed in zip(prompts, seeds, strict=True)
        ]

        def run():
            with serve_lock:
                return engine.generate(requests), engine.policy_step

        try:
            outputs, step = await run_in_threadpool(run)
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
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
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model or model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "policy_step": step,
            "ref_weight": engine.ref_weight,
        }

    return app


def _parse_completion(body: CompletionRequest, engine: Engine, limits: ServerLimits):
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
    if not (math.isfinite(temperature) and temperature >= 0):
        raise BadRequest(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must lie in (0, 1], got {top_p}")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise BadRequest(f"logprobs must lie in [0, 5], got {body.logprobs}")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stop) > limits.max_stop:
        raise BadRequest(f"at most {limits.max_stop} stop strings, got {len(stop)}")
    if stop and not engine.has_tokenizer:
        raise BadRequest("stop strings need a tokenizer; this server runs in token-id mode (no tokenizer files)")

    prompt: Any = body.prompt
    if isinstance(prompt, str):
        prompts_raw: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts_raw = [list(prompt)]
    else:
        prompts_raw = list(prompt)
    if not prompts_raw:
        raise BadRequest("prompt is empty")
    if len(prompts_raw) > limits.max_prompts:
        raise BadRequest(f"{len(prompts_raw)} prompts exceed this server's limit of {limits.max_prompts}")
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
    bad_stop = [t for t in body.stop_token_ids or () if not 0 <= t < engine.vocab_size]
    if bad_stop:
        raise BadRequest(f"unknown stop_token_ids {bad_stop[:8]} (vocabulary size {engine.vocab_size})")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stop,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
    )
    if body.seeds is None:
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        seeds = [derive_seed(seed, i) for i in range(len(prompts))]
    elif body.seed is not None:
        raise BadRequest("give either seed or seeds (one per prompt), not both")
    elif len(body.seeds) != len(prompts):
        raise BadRequest(f"seeds has {len(body.seeds)} entries for {len(prompts)} prompts: give one per prompt")
    else:
        seeds = list(body.seeds)
    return prompts, params, body.n, seeds


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


def serve(engine: Engine, host: str, port: int, token: str | None, limits: ServerLimits, log_level: str = "warning"):
    import uvicorn

    sock = bind_socket(host, port)
    app = create_app(engine, token=token, limits=limits)
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
    import os

    import torch
    import yaml

    parser = argparse.ArgumentParser(description="Serve pi_mix (logit average of policy and reference)")
    parser.add_argument("--config", help="YAML with any of the settings below (flags win)")
    parser.add_argument("--policy", help="Hugging Face directory of the policy")
    parser.add_argument("--reference", help="Hugging Face directory of the reference")
    parser.add_argument("--ref-weight", type=float, help="reference weight a in [0, 1]")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--token", help=f"bearer token required on every endpoint (or set {TOKEN_ENV})")
    parser.add_argument("--max-n", type=int, help="largest n per request (default 64)")
    parser.add_argument("--max-tokens", type=int, help="largest max_tokens per request (default 4096)")
    parser.add_argument("--max-prompts", type=int, help="most prompts per request (default 512)")
    parser.add_argument("--max-batch-size", type=int, help="sequences decoded together (default 256)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--policy-step", type=int, help="step of the initial policy weights (default 0)")
    parser.add_argument("--engine", choices=["torch", "vllm"], help="torch (default) or vllm")
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
        "policy", "reference", "ref_weight", "host", "port", "token", "max_n", "max_tokens", "max_prompts",
        "max_batch_size", "threads", "policy_step", "engine", "vllm", "device",
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
    vllm_args = settings.get("vllm") or {}
    if not isinstance(vllm_args, dict):
        parser.error("the vllm setting must be a mapping of vllm.LLM arguments")
    if vllm_args and engine_name != "vllm":
        parser.error("vllm settings were given but the engine is not vllm (set engine: vllm)")
    if settings.get("device") and engine_name != "torch":
        parser.error("--device is the torch engine's (vLLM places its workers itself)")
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))

    host = settings.get("host", "127.0.0.1")
    port = int(settings.get("port", 8000))
    held = bind_socket(host, port)  # fail fast, before loading models, when the port is taken
    held.close()

    engine_kwargs = {
        "max_batch_size": int(settings.get("max_batch_size", 256)),
        "policy_step": int(settings.get("policy_step", 0)),
    }
    if engine_name == "vllm":
        from nemo_logitavg.rollout.vllm_engine import VLLMEngine as engine_class

        engine_kwargs["engine_args"] = dict(vllm_args)
    else:
        from nemo_logitavg.rollout.engine import TorchEngine as engine_class

        engine_kwargs["device"] = settings.get("device") or "cpu"
    served_engine = engine_class(
        settings["policy"], settings.get("reference"), float(settings["ref_weight"]), **engine_kwargs
    )
    server_limits = ServerLimits(
        max_n=int(settings.get("max_n", 64)),
        max_tokens=int(settings.get("max_tokens", 4096)),
        max_prompts=int(settings.get("max_prompts", 512)),
    )
    if hasattr(served_engine, "close"):  # the vLLM engine has processes of its own to stop on the way out
        import signal

        # uvicorn re-raises SIGTERM after its graceful shutdown; as an exception it lets the finally below run.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        serve(served_engine, host, port, settings.get("token"), server_limits, log_level=args.log_level)
    finally:
        if hasattr(served_engine, "close"):
            served_engine.close()
