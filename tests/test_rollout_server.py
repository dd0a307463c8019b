"""The rollout server as a real subprocess on 127.0.0.1: the OpenAI client, errors, auth, weight reload, and
the RolloutClient failing over between two servers and coming back to a restarted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from nemo_logitavg.ops import mixed_logprobs
from nemo_logitavg.rollout.client import RolloutClient, RolloutError, RolloutRequestError
from nemo_logitavg.rollout.process import free_port
from tests.test_rollout import hf_logits, make_tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-token"
REF_WEIGHT = 0.5
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Server:
    """``python -m nemo_logitavg.rollout.server`` on 127.0.0.1:port, logging to a file."""

    def __init__(self, dirs: dict, log_dir, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(log_dir, f"server-{self.port}-{time.monotonic_ns()}.log")
        cmd = [
            sys.executable, "-m", "nemo_logitavg.rollout.server", "--policy", dirs["policy"],
            "--reference", dirs["reference"], "--ref-weight", str(REF_WEIGHT), "--port", str(self.port),
            "--token", TOKEN, "--threads", "1", "--max-n", "8", "--max-tokens", "64", *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 90.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{open(self.log).read()}")
            try:
                if httpx.get(self.url + "/health", headers=AUTH, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server on {self.url} did not come up:\n{open(self.log).read()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_models")
    return {
        "root": str(root),
        "policy": make_tiny_llama(root / "policy", seed=1, tokenizer=True),
        "reference": make_tiny_llama(root / "reference", seed=2),
        "policy2": make_tiny_llama(root / "policy2", seed=3),
    }


@pytest.fixture(scope="module")
def server(dirs):
    srv = Server(dirs, dirs["root"]).wait()
    yield srv
    srv.stop()


def teacher_forced(dirs, policy_key, prompt, tokens, temperature=1.0):
    ids = prompt + tokens
    z_pol = hf_logits(dirs[policy_key], ids)[len(prompt) - 1 : -1]
    z_ref = hf_logits(dirs["reference"], ids)[len(prompt) - 1 : -1]
    return mixed_logprobs(z_pol, z_ref, torch.tensor(tokens), REF_WEIGHT, temperature=temperature)


@pytest.mark.slow
def test_openai_client_completions(server, dirs):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
    prompt = [5, 17, 33]
    out = client.completions.create(
        model="pi_mix", prompt=prompt, max_tokens=12, n=2, temperature=0.9, seed=7, logprobs=1,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert len(out.choices) == 2 and out.usage.completion_tokens == 24
    assert out.model_extra["policy_step"] == 0
    for choice in out.choices:
        token_ids = choice.model_extra["token_ids"]
        assert len(token_ids) == len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) == 12
        words = [t for t in choice.logprobs.tokens if t not in ("<s>", "</s>")]  # special tokens: not in text
        assert choice.finish_reason == "length" and choice.text == " ".join(words)
        expected = teacher_forced(dirs, "policy", prompt, token_ids, temperature=0.9)
        assert (torch.tensor(choice.logprobs.token_logprobs) - expected).abs().max() < 1e-4
    # Text prompts (batch of two), stop strings, and the same seed giving the same completion.
    texts = client.completions.create(model="pi_mix", prompt=["w5 w17 w33", "w9"], max_tokens=12, seed=7, logprobs=1)
    assert len(texts.choices) == 2 and [c.index for c in texts.choices] == [0, 1]
    again = client.completions.create(model="pi_mix", prompt=["w5 w17 w33", "w9"], max_tokens=12, seed=7, logprobs=1)
    assert [c.model_extra["token_ids"] for c in texts.choices] == [c.model_extra["token_ids"] for c in again.choices]
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert models["ref_weight"] == REF_WEIGHT and models["data"][0]["policy_step"] == 0
    assert [m.id for m in client.models.list()] == ["pi_mix"]


@pytest.mark.slow
def test_malformed_requests_and_auth(server):
    url = server.url + "/v1/completions"
    good = {"prompt": [5, 6], "max_tokens": 3}
    bad_bodies = {
        "unknown token id": {"prompt": [5, 48]},
        "negative token id": {"prompt": [[5], [-1]]},
        "n over limit": {**good, "n": 9},
        "max_tokens over limit": {**good, "max_tokens": 65},
        "wrong type": {"prompt": [5, "x"]},
        "n wrong type": {**good, "n": "2"},
        "empty prompt": {"prompt": []},
        "bad top_p": {**good, "top_p": 0},
        "negative temperature": {**good, "temperature": -1},
        "streaming": {**good, "stream": True},
        "no prompt": {"max_tokens": 3},
        "seeds of another length": {"prompt": [[5], [6]], "seeds": [1]},
        "seed and seeds": {"prompt": [[5]], "seed": 1, "seeds": [1]},
    }
    for name, body in bad_bodies.items():
        r = httpx.post(url, json=body, headers=AUTH)
        assert 400 <= r.status_code < 500, name
        assert r.json()["error"]["message"], name
    r = httpx.post(url, content=b'{"prompt": [5, 6', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert "48" in httpx.post(url, json={"prompt": [5, 48]}, headers=AUTH).json()["error"]["message"]
    r = httpx.post(server.url + "/v1/load_weights", json={"path": "/nonexistent", "step": 1}, headers=AUTH)
    assert r.status_code == 400 and "nonexistent" in r.json()["error"]["message"]
    for path in ("/health", "/v1/models"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(url, json=good).status_code == 401
    assert httpx.post(server.url + "/v1/load_weights", json={"path": "x", "step": 1}).status_code == 401
    # Still serving.
    r = httpx.post(url, json=good, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) >= 1
    # A second server on the held port refuses to start, saying why.
    second = Server({"policy": "unused", "reference": "unused"}, os.path.dirname(server.log), server.port)
    assert second.proc.wait(60) != 0
    assert "cannot listen" in open(second.log).read()


@pytest.mark.slow
def test_weight_reload_and_check(server, dirs):
    client = RolloutClient([server.url], token=TOKEN, timeout=60)
    client.check(REF_WEIGHT)
    with pytest.raises(RolloutError, match="ref_weight"):
        client.check(0.3)
    assert client.load_weights(dirs["policy2"], 5) == {server.url: 5}
    prompts = [[5, 17, 33], [8]]
    groups = client.generate(prompts, n=2, max_tokens=10, temperature=1.0, seed=3)
    for prompt, group in zip(prompts, groups, strict=True):
        for c in group:
            assert c.policy_step == 5 and len(c.token_ids) == len(c.logprobs)
            expected = teacher_forced(dirs, "policy2", prompt, c.token_ids)
            assert (torch.tensor(c.logprobs) - expected).abs().max() < 1e-4
    assert httpx.get(server.url + "/v1/models", headers=AUTH).json()["policy_step"] == 5
    with pytest.raises(RolloutRequestError, match="unknown token"):
        client.generate([[5, 4800]], n=1, max_tokens=2)
    client.close()


@pytest.mark.slow
def test_client_chunks_give_what_one_request_gives(server):
    """However the client cuts a call into requests, prompt i gets seed derive_seed(s, i): the completions are
    those of one request carrying every prompt with seed s."""
    prompts = [[5 + i, 17, 33][: 1 + i % 3] for i in range(7)]
    kwargs = dict(n=3, max_tokens=12, temperature=1.0)
    body = {"prompt": prompts, "seed": 21, "ignore_eos": True, **kwargs}
    whole = httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=60).json()["choices"]
    expected = [[whole[i * 3 + j]["token_ids"] for j in range(3)] for i in range(len(prompts))]
    for per_request in (1, 2, 64):
        with RolloutClient([server.url], token=TOKEN, timeout=60, prompts_per_request=per_request) as client:
            groups = client.generate(prompts, seed=21, ignore_eos=True, **kwargs)
        assert [[c.token_ids for c in g] for g in groups] == expected, per_request
    assert len({tuple(t) for g in expected for t in g}) > len(prompts)  # the samples do differ


@pytest.mark.slow
def test_failover_to_another_server_and_back(dirs, tmp_path):
    a, b = Server(dirs, str(tmp_path)), Server(dirs, str(tmp_path))
    try:
        a.wait(), b.wait()
        # One prompt a request: many small requests, so some are still in flight when A is killed.
        client = RolloutClient(
            [a.url, b.url], token=TOKEN, timeout=60, backoff=0.1, cooldown=1.0, max_attempts=6, prompts_per_request=1
        )
        client.load_weights(dirs["policy2"], 3)
        prompts = [[5 + i, 7, 9] for i in range(12)]
        kwargs = dict(n=4, max_tokens=48, seed=11, ignore_eos=True)
        baseline = client.generate(prompts, **kwargs)
        assert {c.server for g in baseline for c in g} == {a.url, b.url}

        # Kill server A while a run is in flight: every completion still arrives, identical (seeded per prompt).
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(out=client.generate(prompts, **kwargs)))
        runner.start()
        time.sleep(0.3)
        in_flight = runner.is_alive()
        a.kill()
        runner.join(120)
        assert in_flight
        assert [[c.token_ids for c in g] for g in result["out"]] == [[c.token_ids for c in g] for g in baseline]
        after = client.generate(prompts[:4], **kwargs)
        assert {c.server for g in after for c in g} == {b.url}

        # A restarts on the same port with its start-up policy (step 0): it is stale, so it gets nothing (the
        # client no longer re-pushes by path) until weights land in it again; then it serves.
        a = Server(dirs, str(tmp_path), a.port).wait()
        time.sleep(1.1)  # past the cooldown
        stale = client.generate(prompts[:4], **kwargs)
        assert {c.server for g in stale for c in g} == {b.url}
        client.load_weights(dirs["policy2"], 4)
        back = client.generate(prompts, **kwargs)
        assert a.url in {c.server for g in back for c in g}
        assert all(c.policy_step == 4 for g in back for c in g)
        assert [[c.token_ids for c in g] for g in back] == [[c.token_ids for c in g] for g in baseline]
        client.close()
    finally:
        a.stop()
        b.stop()
