"""The trainer's Protocols (``nemo_logitavg.trainer.interfaces``) describe the real actor, client and completion.

The real classes do not inherit from the Protocols: these checks keep the two from drifting apart. Each method
the trainer calls must exist on the real class and take the Protocol's parameters by the same names; the data
attributes are checked on live objects with ``isinstance`` (``runtime_checkable``).
"""

from __future__ import annotations

import inspect

import pytest

from nemo_logitavg.models.actor import LogitAveragingActor
from nemo_logitavg.rollout.client import Completion, RolloutClient
from nemo_logitavg.trainer.interfaces import ActorProtocol, CompletionProtocol, RolloutClientProtocol
from tests.distributed import run_distributed
from tests.tiny_models import TINY


def _methods(protocol: type) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]


@pytest.mark.parametrize(
    ("protocol", "real"), [(ActorProtocol, LogitAveragingActor), (RolloutClientProtocol, RolloutClient)]
)
def test_real_classes_have_the_protocol_methods_with_their_parameters(protocol, real):
    assert _methods(protocol), protocol
    for name in _methods(protocol):
        wanted = inspect.signature(getattr(protocol, name)).parameters
        have = inspect.signature(getattr(real, name)).parameters
        for param in wanted.values():
            assert param.name in have, f"{real.__name__}.{name} lacks parameter {param.name}"
            assert have[param.name].kind == param.kind, f"{real.__name__}.{name}({param.name}): another kind"
            if param.default is not inspect.Parameter.empty:
                assert have[param.name].default == param.default, f"{real.__name__}.{name}({param.name})"
        extra = [p for p in have.values() if p.name not in wanted and p.default is inspect.Parameter.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # fmt: skip
        assert not extra, f"{real.__name__}.{name} requires parameters the trainer never passes: {extra}"


def test_rollout_client_and_completion_are_instances_of_the_protocols():
    client = RolloutClient(["http://127.0.0.1:9"])  # no request is made
    try:
        assert isinstance(client, RolloutClientProtocol)
    finally:
        client.close()
    completion = Completion(token_ids=[1], logprobs=[-0.5], text="a", finish_reason="stop", policy_step=0)
    assert isinstance(completion, CompletionProtocol)


def _actor_is_protocol() -> dict:
    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig
    from nemo_logitavg.parallel import init_parallel, teardown

    init_parallel()
    actor = LogitAveragingActor(LlamaConfig(**TINY), None, ActorConfig())
    result = {"isinstance": isinstance(actor, ActorProtocol)}
    teardown()
    return result


def test_actor_is_an_instance_of_the_protocol():
    assert run_distributed(_actor_is_protocol, 1)[0]["isinstance"]
