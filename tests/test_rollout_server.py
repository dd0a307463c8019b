"""The rollout server as a real subprocess on 127.0.0.1: the OpenAI client, errors, auth, weight reload, and
the RolloutClient failing over between two servers and coming back to a restarted one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import torch

from nemo_logitavg.ops import mixed_logprobs
from nemo_logitavg.rollout.client import RolloutClient, RolloutError, RolloutRequestError
from nemo_logitavg.rollout.process import ServerProcess, free_port
from tests.test_rollout import hf_logits, make_tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "test-token"
REF_WEIGHT = 0.5
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}


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
        if "root" in dirs:
            cmd += ["--weights-root", dirs["root"]]
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 240.0) -> Server:
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
        self.kill()  # never left running behind a failed test
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
    missing = {"path": "nonexistent", "step": 1, "run_id": "x"}
    r = httpx.post(server.url + "/v1/load_weights", json=missing, headers=AUTH)
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
    """However the client cuts a call into requests, prompt i gets seed prompt_seed(s, i): the completions are
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


def _start_process(dirs, tmp_path, **kwargs) -> ServerProcess:
    log = str(tmp_path / f"process-{time.monotonic_ns()}.log")
    extra = ["--threads", "1", *kwargs.pop("extra_args", [])]
    return ServerProcess(dirs["policy"], dirs["reference"], REF_WEIGHT, log, extra_args=extra, **kwargs)


@pytest.mark.slow
def test_stop_is_prompt_with_sigterm_blocked_in_the_parent(dirs, tmp_path):
    """The trainer blocks SIGTERM/USR1 (StopRequested); the server child must still stop on stop()'s SIGTERM
    (not after 20 s by SIGKILL) and keep ignoring USR1."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    try:
        server = _start_process(dirs, tmp_path).wait_ready(120)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    proc = psutil.Process(server.proc.pid)
    family = [proc, *proc.children(recursive=True)]
    server.proc.send_signal(signal.SIGUSR1)  # ignored: the server keeps serving through Slurm's warning
    assert httpx.get(server.url + "/health", headers=server.auth_headers(), timeout=10).status_code == 200
    start = time.monotonic()
    server.stop()
    took = time.monotonic() - start
    assert took < 5, f"stop() took {took:.1f} s"
    assert server.proc.returncode != -signal.SIGKILL
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive


@pytest.mark.slow
def test_token_travels_in_the_environment_and_defaults_to_random(dirs, tmp_path):
    chosen = _start_process(dirs, tmp_path, token="chosen-secret-token")
    drawn = _start_process(dirs, tmp_path)  # no token given: a random one
    try:
        for server in (chosen.wait_ready(120), drawn.wait_ready(120)):
            cmdline = " ".join(psutil.Process(server.proc.pid).cmdline())
            assert server.token and server.token not in cmdline and "--token" not in cmdline
            assert httpx.get(server.url + "/health", timeout=10).status_code == 401
            assert httpx.get(server.url + "/health", headers=server.auth_headers(), timeout=10).status_code == 200
        assert chosen.token == "chosen-secret-token" and len(drawn.token) >= 32
    finally:
        chosen.stop()
        drawn.stop()


@pytest.mark.slow
def test_temperature_below_the_floor_is_refused_and_never_retried(server, dirs, tmp_path):
    url = server.url + "/v1/completions"
    body = {"prompt": [5, 6], "max_tokens": 8, "ignore_eos": True, "seed": 1}
    r = httpx.post(url, json={**body, "temperature": 1e-44}, headers=AUTH, timeout=60)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    at_floor = httpx.post(url, json={**body, "temperature": 1e-3}, headers=AUTH, timeout=60).json()
    logprobs = at_floor["choices"][0]["logprobs"]["token_logprobs"]
    assert len(logprobs) == 8 and all(math.isfinite(x) and x <= 0 for x in logprobs)
    # Two servers: a 4xx is the request's fault, raised at once, not tried on the other server or again.
    other = Server(dirs, str(tmp_path)).wait()
    try:
        with RolloutClient([server.url, other.url], token=TOKEN, timeout=60, backoff=5.0) as client:
            start = time.monotonic()
            with pytest.raises(RolloutRequestError, match="temperature"):
                client.generate([[5, 6]], n=1, max_tokens=8, temperature=1e-44)
            assert time.monotonic() - start < 5.0  # one backoff (5 s) would already exceed this
    finally:
        other.stop()


@pytest.mark.slow
def test_health_answers_while_a_maximal_request_is_parsed(server):
    limits = httpx.get(server.url + "/v1/models", headers=AUTH).json()["limits"]
    # The largest body the server takes: 512 prompts of token ids (each far too long, refused after parsing).
    per_prompt = (limits["max_body_bytes"] - 4096) // limits["max_prompts"] // 3
    ids = json.dumps({"prompt": [[47] * per_prompt] * limits["max_prompts"], "max_tokens": 1}, separators=(",", ":"))
    assert limits["max_body_bytes"] - 8192 < len(ids) <= limits["max_body_bytes"]
    # The most text it tokenizes: 512 prompts at the character limit, each one unknown word (<unk>: 2 tokens).
    texts = {"prompt": ["w" * limits["max_prompt_chars"]] * limits["max_prompts"], "max_tokens": 1}
    # A text prompt of 3.9M characters (tokenizing 4M on the event loop held /health for 9.4 s).
    huge = {"prompt": "w5 " * 1_300_000, "max_tokens": 1}
    bodies = [ids.encode(), json.dumps(texts).encode(), json.dumps(huge).encode()]
    results: list = []

    def big() -> None:
        for body in bodies:
            start = time.monotonic()
            r = httpx.post(server.url + "/v1/completions", content=body, headers=JSON_AUTH, timeout=120)
            results.append((r.status_code, r.text[:200], time.monotonic() - start))

    latencies, answered = [], []
    with httpx.Client(headers=AUTH, timeout=60) as health:
        health.get(server.url + "/health")  # connected before the big requests start
        runner = threading.Thread(target=big)
        runner.start()
        while runner.is_alive():
            start = time.monotonic()
            assert health.get(server.url + "/health").status_code == 200
            latencies.append(time.monotonic() - start)
            answered.append(runner.is_alive())  # this answer came while a big request was still open
            time.sleep(0.02)
    runner.join()
    assert max(latencies) < 1.0, (max(latencies), results)
    assert sum(answered) >= 3, (latencies, results)
    assert [status for status, _, _ in results] == [400, 200, 400], results
    assert "context length" in results[0][1] and "characters" in results[2][1]


@pytest.mark.slow
def test_limits_are_checked_before_work(server):
    url = server.url + "/v1/completions"
    limits = httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]["limits"]
    assert limits["max_n"] == 8 and limits["max_tokens"] == 64 and limits["max_prompt_chars"] == 32 * 128
    over = b"[" + b"1," * (limits["max_body_bytes"] // 2) + b"1]"
    r = httpx.post(url, content=over, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the server counts while reading
        for _ in range(limits["max_body_bytes"] // (1 << 16) + 2):
            yield b" " * (1 << 16)

    r = httpx.post(url, content=chunked(), headers=AUTH, timeout=60)
    assert r.status_code == 413
    # A 3.9M-character text prompt is refused by its length, before tokenizing (4M took 9.4 s and 770 MB).
    start = time.monotonic()
    r = httpx.post(url, json={"prompt": "w5 " * 1_300_000, "max_tokens": 1}, headers=AUTH, timeout=60)
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    refused_in = time.monotonic() - start
    start = time.monotonic()
    assert httpx.post(url, json={"prompt": "w5 " * 40, "max_tokens": 1}, headers=AUTH, timeout=60).status_code == 200
    assert refused_in < 10 * max(time.monotonic() - start, 0.1)  # refusing costs about a small request
    good = {"prompt": [5, 6], "max_tokens": 2}
    too_many = {
        "stop string too long": {**good, "stop": ["x" * (limits["max_stop_chars"] + 1)]},
        "too many stop strings": {**good, "stop": ["x"] * (limits["max_stop"] + 1)},
        "too many stop_token_ids": {**good, "stop_token_ids": [3] * (limits["max_stop_token_ids"] + 1)},
        "too many prompts": {"prompt": [[5]] * (limits["max_prompts"] + 1), "max_tokens": 1},
    }
    for name, body in too_many.items():
        r = httpx.post(url, json=body, headers=AUTH, timeout=60)
        assert r.status_code == 400 and "limit" in r.json()["error"]["message"] or "at most" in r.text, name


@pytest.mark.slow
def test_client_sizes_its_requests_to_the_advertised_limits(server, dirs, tmp_path):
    small = Server(dirs, str(tmp_path), None, "--max-prompts", "3", "--max-work-tokens", "100").wait()
    try:
        prompts = [[5 + i, 17, 33][: 1 + i % 3] for i in range(10)]
        kwargs = dict(n=2, max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
        over = {"prompt": prompts[:3], "n": 4, "max_tokens": 12}  # 4 x (6 + 36) = 168 work tokens
        r = httpx.post(small.url + "/v1/completions", json=over, headers=AUTH, timeout=60)
        assert r.status_code == 400 and "100 tokens" in r.json()["error"]["message"]
        with RolloutClient([small.url], token=TOKEN, timeout=60) as client:
            with pytest.raises(RolloutRequestError, match="limit"):
                client.generate(prompts, **kwargs)  # limits unknown before check(): 10 prompts in one request
            client.check(REF_WEIGHT)
            sized = client.generate(prompts, **kwargs)
        with RolloutClient([server.url], token=TOKEN, timeout=60) as client:
            client.load_weights(dirs["policy"], 0)  # what the small server serves (another test may have pushed)
            whole = client.generate(prompts, **kwargs)
        assert [[c.token_ids for c in g] for g in sized] == [[c.token_ids for c in g] for g in whole]
        assert all(len(c.token_ids) == 12 for g in sized for c in g)
    finally:
        small.stop()


@pytest.mark.slow
def test_load_weights_stays_in_its_root_and_steps_rise(server, dirs, tmp_path):
    import shutil

    def load(path: str, step: int, run_id: str = "run-a") -> httpx.Response:
        body = {"path": path, "step": step, "run_id": run_id}
        return httpx.post(server.url + "/v1/load_weights", json=body, headers=AUTH, timeout=60)

    root = dirs["root"]
    # Outside the root: an absolute path elsewhere, a relative escape, a symlink out of the root.
    outside = shutil.copytree(dirs["policy2"], tmp_path / "outside")
    os.symlink(outside, os.path.join(root, "link_out"))
    for path in (str(outside), "../" + os.path.basename(tmp_path) + "/outside", "link_out"):
        r = load(path, 1)
        assert r.status_code == 403 and "outside" in r.json()["error"]["message"], path
    # An index naming another model's file (inside the root, outside the directory): refused, not served.
    evil = os.path.join(root, "evil")
    os.makedirs(evil)
    shutil.copy(os.path.join(dirs["policy2"], "config.json"), evil)
    from safetensors import safe_open

    with safe_open(os.path.join(dirs["policy2"], "model.safetensors"), "pt") as f:
        names = list(f.keys())
    with open(os.path.join(evil, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {name: "../policy2/model.safetensors" for name in names}}, f)
    r = load("evil", 1)
    assert r.status_code == 400 and "outside the directory" in r.json()["error"]["message"]
    # A corrupt file: a 500 that names neither the file nor the exception (the server's log has them).
    corrupt = os.path.join(root, "corrupt")
    os.makedirs(corrupt)
    shutil.copy(os.path.join(dirs["policy2"], "config.json"), corrupt)
    with open(os.path.join(corrupt, "model.safetensors"), "wb") as f:
        f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    r = load("corrupt", 1)
    message = r.json()["error"]["message"]
    assert r.status_code == 500 and "corrupt" not in message and "rror" not in message.replace("error", "")
    # Steps rise within a run; an exact repeat is a no-op; a new run starts anywhere.
    assert load("policy2", 7).json()["policy_step"] == 7
    assert load("policy2", 7).status_code == 200  # a retried push
    assert load("policy2", 6).status_code == 409
    assert load("policy", 7).status_code == 409  # the same step with other weights
    assert load("policy", 8).json()["policy_step"] == 8
    assert load("policy2", 2, run_id="run-b").json()["policy_step"] == 2
    assert httpx.get(server.url + "/v1/models", headers=AUTH).json()["policy_step"] == 2
    # Without --weights-root the endpoint is refused.
    bare = Server({k: v for k, v in dirs.items() if k != "root"}, str(tmp_path)).wait()
    try:
        r = httpx.post(bare.url + "/v1/load_weights", json={"path": dirs["policy2"], "step": 1, "run_id": "a"},
                       headers=AUTH, timeout=60)  # fmt: skip
        assert r.status_code == 403 and "--weights-root" in r.json()["error"]["message"]
    finally:
        bare.stop()


@pytest.mark.slow
def test_a_dead_server_is_skipped_not_waited_for(dirs, tmp_path):
    """With one of two servers killed, the next three steps (push + rollout, as the trainer does) take about as
    long as a healthy one, not the ~60 s of backoff a push to a dead server took (8 attempts, 0.5 s doubling)."""
    a, b = Server(dirs, str(tmp_path)), Server(dirs, str(tmp_path))
    try:
        a.wait(300), b.wait(300)
        client = RolloutClient([a.url, b.url], token=TOKEN, timeout=60, prompts_per_request=2)  # default backoff
        prompts = [[5 + i, 7, 9] for i in range(8)]

        def step(k: int) -> float:
            start = time.monotonic()
            client.load_weights(dirs["policy2"], k)
            groups = client.generate(prompts, n=2, max_tokens=16, seed=k, ignore_eos=True)
            assert all(c.policy_step == k for g in groups for c in g)
            return time.monotonic() - start

        healthy = step(1)
        a.kill()
        for k in (2, 3, 4):
            with pytest.warns(UserWarning, match="not loaded by"):
                took = step(k)
            assert took < 3 * healthy + 5.0, (k, took, healthy)  # the old push alone slept 61.5 s
        assert client.is_down(a.url) and not client.is_down(b.url)
        client.close()
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
def test_a_dropped_request_stops_decoding(server):
    url = server.url + "/v1/completions"
    small = {"prompt": [5, 6], "max_tokens": 8, "ignore_eos": True, "seed": 1}
    start = time.monotonic()
    assert httpx.post(url, json=small, headers=AUTH, timeout=120).status_code == 200
    t_small = time.monotonic() - start
    # 4096 sequences of 64 tokens: far longer than the client waits for it.
    long = {"prompt": [[5 + i % 40, 6] for i in range(512)], "n": 8, "max_tokens": 64, "ignore_eos": True}
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=long, headers=AUTH, timeout=httpx.Timeout(60, read=2.0))
    dropped_after = time.monotonic() - start
    start = time.monotonic()
    assert httpx.post(url, json=small, headers=AUTH, timeout=300).status_code == 200
    t_after = time.monotonic() - start
    assert t_after < 3 * t_small + 3.0, (t_after, t_small, dropped_after)


@pytest.mark.slow
def test_wait_ready_accepts_only_its_own_child(dirs, tmp_path):
    """Another process takes the picked port before the child binds it: wait_ready must not take that process's
    /health for the child's (the child then fails to bind and wait_ready says so)."""
    import http.server

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b'{"status": "ok", "policy_step": 0}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = _start_process(dirs, tmp_path)
    port = int(server.url.rsplit(":", 1)[1])
    impostor = http.server.HTTPServer(("127.0.0.1", port), Impostor)  # before the child's interpreter is up
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RuntimeError, match="exited"):
            server.wait_ready(120)
        assert "cannot listen" in server._tail()
    finally:
        impostor.shutdown()
        impostor.server_close()
        server.stop()


@pytest.mark.slow
def test_health_is_not_ok_when_the_engine_is_dead(dirs):
    """A real engine and uvicorn on 127.0.0.1; the engine reports itself dead as vLLM's does when its engine
    process exits (VLLMEngine.alive), and /health says so instead of "ok"."""
    import uvicorn

    from nemo_logitavg.rollout.engine import TorchEngine
    from nemo_logitavg.rollout.server import bind_socket, create_app

    engine = TorchEngine(dirs["policy"], dirs["reference"], REF_WEIGHT)
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=lambda: uv.run(sockets=[sock]), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not uv.started and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
        engine.alive = lambda: False
        r = httpx.get(url + "/health", timeout=30)
        assert r.status_code == 503 and r.json()["status"] == "engine dead"
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
