"""What the rollout server answers: the OpenAI-style error body, the completions response, and where the engine's
weights live (for ``GET /v1/models``). The protocol is described in ``server``'s docstring."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence

import torch
from fastapi.responses import JSONResponse

from nemo_logitavg.rollout.engine import Engine, GeneratedSequence


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """``{"error": {"message", "type", "code"}}`` with HTTP status ``status``."""
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "code": status}})


def render_completions(
    engine: Engine,
    model: str,
    prompts: list[list[int]],
    n: int,
    outputs: Sequence[Sequence[GeneratedSequence]],
    step: int,
) -> bytes:
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


def device_info(engine: Engine) -> dict:
    """Where the engine's weights live: the trainer picks NCCL only between GPUs that are not the same one."""
    device = torch.device(getattr(engine, "device", "cpu"))
    uuid_ = None
    if device.type == "cuda":
        uuid_ = str(torch.cuda.get_device_properties(device).uuid)
    return {"type": device.type, "gpu_uuid": uuid_}
