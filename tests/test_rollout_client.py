"""RolloutClient without servers: retries with exponential backoff on 5xx and connection errors, fail-over,
stale-step refusal, and the final error naming the server(s). Uses httpx.MockTransport and a closed port."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from nemo_logitavg.rollout import client as client_module
from nemo_logitavg.rollout.client import RolloutClient, RolloutError, RolloutRequestError
from nemo_logitavg.seeds import prompt_seed


def completion(request: httpx.Request, step: int, token: int = 7) -> dict:
    """A response to ``request`` with one choice per prompt and sample, each the single token ``token``."""
    body = json.loads(request.content)
    choice = {"token_ids": [token], "logprobs": {"tokens": ["t"], "token_logprobs": [-1.5]}, "text": "t"}
    count = len(body["prompt"]) * body["n"]
    return {"choices": [{**choice, "index": i, "finish_reason": "length"} for i in range(count)], "policy_step": step}


@pytest.fixture
def sleeps(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    return slept


def test_retries_5xx_with_exponential_backoff(sleeps):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if len(calls) <= 3:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json=completion(request, 0))

    client = RolloutClient("http://127.0.0.1:1/v1", transport=httpx.MockTransport(handler), backoff=0.5)
    (group,) = client.generate([[1, 2]], n=2, max_tokens=1, seed=0)
    assert [c.token_ids for c in group] == [[7], [7]] and group[0].logprobs == [-1.5]
    assert len(calls) == 4 and all(u == "http://127.0.0.1:1/v1/completions" for u in calls)
    assert sleeps == [0.5, 1.0, 2.0]


def test_prompts_are_chunked_with_one_seed_each():
    bodies: dict[int, list[dict]] = {3: [], 4: []}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies[request.url.port].append(body)
        reply = completion(request, 0)
        for k, prompt in enumerate(body["prompt"]):  # answer each prompt with its own first token
            for j in range(body["n"]):
                reply["choices"][k * body["n"] + j]["token_ids"] = [prompt[0]]
        return httpx.Response(200, json=reply)

    urls = ["http://127.0.0.1:3", "http://127.0.0.1:4"]
    client = RolloutClient(urls, transport=httpx.MockTransport(handler), prompts_per_request=3)
    prompts = [[100 + i, 1] for i in range(10)]
    groups = client.generate(prompts, n=2, max_tokens=1, seed=42)
    assert [[c.token_ids for c in g] for g in groups] == [[[100 + i]] * 2 for i in range(10)]
    sent = sorted((b for port in bodies for b in bodies[port]), key=lambda b: b["prompt"][0][0])
    assert [len(b["prompt"]) for b in sent] == [3, 3, 3, 1]  # at most prompts_per_request, in order
    assert [s for b in sent for s in b["seeds"]] == [prompt_seed(42, i) for i in range(10)]
    assert all("seed" not in b for b in sent) and bodies[3] and bodies[4]  # both servers used
    # Few prompts: one chunk per server.
    bodies[3].clear(), bodies[4].clear()
    client.generate(prompts[:4], n=1, max_tokens=1)
    assert [len(b["prompt"]) for port in bodies for b in bodies[port]] == [2, 2]
    assert all("seeds" not in b for port in bodies for b in bodies[port])  # no seed: the servers draw one
    assert client.generate([], n=1, max_tokens=1) == []
    with pytest.raises(ValueError, match="prompts_per_request"):
        RolloutClient(urls, prompts_per_request=0)


def test_fails_over_then_names_every_server(sleeps):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.port if request.url.path == "/v1/completions" else request.url.path)
        if request.url.port == 2:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=completion(request, 0))

    urls = ["http://127.0.0.1:2", "http://127.0.0.1:3"]
    client = RolloutClient(urls, transport=httpx.MockTransport(handler), max_workers=1)
    out = client.generate([[1]] * 4, n=1, max_tokens=1)
    assert all(g[0].server == urls[1] for g in out)
    assert seen.count(2) == 1 and sleeps == []  # one refused connection, then the healthy server only
    assert seen.count("/health") == 1 and client.is_down(urls[0])  # one probe, then it is marked down

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="bad gateway")

    client = RolloutClient(urls, transport=httpx.MockTransport(down), max_attempts=4, backoff=0.1)
    with pytest.raises(RolloutError, match=r"after 4 attempts on server\(s\) http://127.0.0.1:2, http://127.0.0.1:3"):
        client.generate([[1]], n=1, max_tokens=1)


def test_real_connection_refused_names_the_server(sleeps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}"
    client = RolloutClient(url, max_attempts=3, backoff=0.01, timeout=5)
    with pytest.raises(RolloutError, match=url) as info:
        client.generate([[1]], n=1, max_tokens=1)
    assert "ConnectError" in str(info.value) and len(sleeps) == 2
    with pytest.raises(RolloutError, match=url):
        client.load_weights("/somewhere", 1)


def test_4xx_is_not_retried_and_stale_servers_get_nothing(sleeps):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1/load_weights":
            return httpx.Response(200, json={"policy_step": 4})
        body = json.loads(request.content)
        if body["prompt"] == [[999]]:
            return httpx.Response(400, json={"error": {"message": "unknown token id(s) [999]"}})
        return httpx.Response(200, json=completion(request, 2))  # a server stuck on step 2

    client = RolloutClient("http://127.0.0.1:9", transport=httpx.MockTransport(handler), max_attempts=2)
    with pytest.raises(RolloutRequestError, match="unknown token"):
        client.generate([[999]], n=1, max_tokens=1)
    assert calls == ["/v1/completions"]
    assert client.load_weights("/weights", 4) == {"http://127.0.0.1:9": 4}
    with pytest.raises(RolloutError, match="not the pushed step 4"):
        client.generate([[1]], n=1, max_tokens=1)
    # No re-push by path (the collective push resyncs stale servers): the stale server now gets nothing.
    assert calls.count("/v1/load_weights") == 1 and client.serving() == []
    served = len(calls)
    with pytest.raises(RolloutError, match="no rollout server holds the pushed policy step 4"):
        client.generate([[1]], n=1, max_tokens=1)
    assert len(calls) == served
    with pytest.warns(UserWarning, match="off-policy"):
        with pytest.raises(RolloutError):
            client.generate([[1]], n=1, max_tokens=1, top_p=0.9)


def test_check_refuses_other_ref_weight():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"ref_weight": 0.5 if request.url.port == 5 else 0.25, "policy_step": 0})

    client = RolloutClient(["127.0.0.1:5", "127.0.0.1:6"], transport=httpx.MockTransport(handler))
    with pytest.raises(RolloutError, match=r"http://127.0.0.1:6 serves ref_weight=0.25"):
        client.check(0.5)
    client = RolloutClient(["127.0.0.1:5"], transport=httpx.MockTransport(handler))
    assert client.check(0.5)["http://127.0.0.1:5"]["ref_weight"] == 0.5


@pytest.mark.parametrize("status", [400, 401, 409, 413, 422])
def test_no_4xx_is_retried_on_any_server(sleeps, status):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.port, request.url.path))
        return httpx.Response(status, json={"error": {"message": f"refused with {status}"}})

    client = RolloutClient(["127.0.0.1:5", "127.0.0.1:6"], transport=httpx.MockTransport(handler))
    with pytest.raises(RolloutRequestError, match=f"refused with {status}"):
        client.generate([[1]], n=1, max_tokens=1)
    assert len(calls) == 1 and sleeps == []
    calls.clear()
    with pytest.raises(RolloutRequestError, match=f"refused with {status}"):
        client.load_weights("weights", 3)
    assert len(calls) <= 2 and all(path == "/v1/load_weights" for _, path in calls) and sleeps == []
