"""The trainer's client for the rollout servers (docs/design.md §7, rollout client API).

    client = RolloutClient(["http://127.0.0.1:8000", "http://127.0.0.1:8001"], token=None, timeout=600)
    client.check(ref_weight=0.5)                       # refuse servers whose pi_mix differs; learn their limits
    client.mark_pushed(step, urls)                     # by the collective push (weight_sender.PolicyPusher)
    groups = client.generate(prompt_token_ids, n=8, max_tokens=512, seed=step_seed(run_seed, step))
    groups[i][j].token_ids, .logprobs, .text, .finish_reason, .policy_step

- The prompts of a call are cut into consecutive chunks, one request each (a chunk's prompts and their ``n``
  samples decode together as one batch on one server): ``ceil(len(prompts) / len(urls))`` prompts a chunk, at
  most ``prompts_per_request``, so every server gets work; and within the limits the servers advertise
  (``/v1/models``: ``max_prompts``, ``max_work_tokens``, ``max_body_bytes``; learned by ``check``, the tightest
  server's apply). Chunks go round-robin over the servers, concurrently
  from a thread pool. Prompt ``i`` of a call with seed ``s`` carries its own seed ``prompt_seed(s, i)`` (the
  request's ``seeds`` field; every seed is derived in ``nemo_logitavg.seeds``), so results depend neither on the
  chunking, nor on how many servers there are, nor on which one answers: the same as one request of all prompts
  with seed ``s`` (bit-identical on one server; equal up to float32 noise across servers).
- A connection error, a timeout or a 5xx moves the request to another server (the one that failed longest
  ago; servers that failed within ``cooldown`` seconds are tried last) and, once every server has failed,
  waits with exponential backoff (``backoff * 2**k``, capped by ``max_backoff``) before trying again, up to
  ``max_attempts`` tries in all; the final error names every server tried and its error. A 4xx is the
  request's fault: raised at once with the server's message.
- A dead server: after a failed request the client probes the server's ``/health`` once (``probe_timeout``); if
  that fails too, the server is marked down: requests skip it (while any other server is up) and pushes and
  ``check`` do not wait for it (a push warns that it missed the step), and a background thread re-probes it every
  ``probe_interval`` seconds until it answers again (it gets requests again once a push lands in it).
  Only when every server is down does the backoff below apply.
- Weight sync: the trainer's collective push (``weight_sender.PolicyPusher``) lands the policy in the servers and
  calls ``mark_pushed(step, urls)`` with the servers that confirmed it; ``load_weights`` (operators, the
  evaluation) does the same by path. After a push only those servers get requests: a server that missed it
  (died, restarted, timed out) is stale until a later push lands in it. A completion that reports another
  ``policy_step`` than the pushed one is never returned: its server is marked stale and the request goes to
  another server. Asynchronous GRPO (``max_staleness = k``): completions of the last ``k`` pushed steps, and of the
  step a push is landing (``begin_push``), are accepted too; the trainer checks each completion's step itself.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from nemo_logitavg.seeds import prompt_seeds

# The client's bounds (the defaults of RolloutClient; config.py's rollout section and wait bound read them here).
REQUEST_TIMEOUT = 600.0  # seconds one request may take, generation included
MAX_ATTEMPTS = 8  # tries per request over all servers
MAX_BACKOFF = 30.0  # the largest wait between two rounds of tries (seconds)


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log pi_mix of each token, at the request temperature (before top-p truncation)
    text: str
    finish_reason: str  # "stop" or "length"
    policy_step: int
    server: str = ""


class RolloutError(RuntimeError):
    """A request failed on every server it was tried on, or a server refused the trainer's settings."""


class RolloutRequestError(RolloutError):
    """A server rejected the request itself (4xx): retrying elsewhere would not help."""


def _normalise(url: str) -> str:
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if "://" not in url:
        url = "http://" + url
    return url


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return str(body["error"].get("message"))
        return str(body)[:500]
    except ValueError:
        return response.text[:500]


class RolloutClient:
    """Args:
    urls: one server URL or several (``http://host:port``, a trailing ``/v1`` is accepted).
    token: the servers' bearer token, if any.
    timeout: seconds allowed for one request (generation included); connecting gets ``min(timeout, 10)``.
    max_attempts: tries per request over all servers.
    backoff, max_backoff: the exponential backoff once every server has failed (seconds).
    cooldown: seconds a failed server is tried after the others.
    probe_timeout: seconds a ``/health`` probe may take; probe_interval: seconds between re-probes of a down server.
    max_workers: concurrent requests (default 4 per server).
    prompts_per_request: the most prompts one request carries (the server's ``max_prompts`` must allow it).
    transport: an httpx transport (tests).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        backoff: float = 0.5,
        max_backoff: float = MAX_BACKOFF,
        cooldown: float = 10.0,
        probe_timeout: float = 5.0,
        probe_interval: float = 5.0,
        max_workers: int | None = None,
        prompts_per_request: int = 64,
        model: str = "pi_mix",
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.urls = [_normalise(u) for u in ([urls] if isinstance(urls, str) else list(urls))]
        if not self.urls:
            raise ValueError("RolloutClient needs at least one server URL")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"duplicate server URLs in {self.urls}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if prompts_per_request < 1:
            raise ValueError(f"prompts_per_request must be >= 1, got {prompts_per_request}")
        self.prompts_per_request = int(prompts_per_request)
        self.timeout = float(timeout)
        self.max_attempts = int(max_attempts)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.cooldown = float(cooldown)
        self.probe_timeout = float(probe_timeout)
        self.probe_interval = float(probe_interval)
        self._down: set[str] = set()
        self._closed = threading.Event()
        self._prober: threading.Thread | None = None
        self.model = model
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            trust_env=False,  # never route the trainer's traffic through a proxy from the environment
            transport=transport,
        )
        self._pool = ThreadPoolExecutor(max_workers=max_workers or 4 * len(self.urls), thread_name_prefix="rollout")
        self._lock = threading.Lock()
        self._failed_at: dict[str, float] = {}
        self._next = 0
        self._limits: dict[str, dict] = {}  # per server: its /v1/models "limits" (learned by check)
        self.run_id = uuid.uuid4().hex  # one trainer run: the servers refuse a step that does not rise within it
        self.policy_step: int | None = None  # the last step pushed (None: serve whatever the servers hold)
        self.server_steps: dict[str, int] = {}  # server -> the step it confirmed; the others are stale
        # Asynchronous GRPO: rollouts run while a push lands, so a completion may come from one of the last
        # `max_staleness` pushed steps or from the step being pushed (`pushing`), not only the pushed one.
        self.max_staleness = 0
        self.pushing: int | None = None

    # -------------------------------------------------------------------------------------------- plumbing

    def close(self) -> None:
        self._closed.set()
        if self._prober is not None:
            self._prober.join()
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def serving(self) -> list[str]:
        """The servers that hold the pushed policy (all of them before any push)."""
        with self._lock:
            if self.policy_step is None:
                return list(self.urls)
            return [u for u in self.urls if self.server_steps.get(u) == self.policy_step]

    def begin_push(self, step: int) -> None:
        """A push of ``step`` starts landing: completions of ``step`` are no longer stale (``mark_pushed`` ends it)."""
        with self._lock:
            self.pushing = int(step)

    def mark_pushed(self, step: int, urls: Sequence[str]) -> None:
        """``urls`` now serve the policy of ``step``; every other server is stale until a push lands in it."""
        with self._lock:
            self.policy_step = int(step)
            self.server_steps = {u: int(step) for u in urls}
            self.pushing = None

    def _mark_stale(self, url: str) -> None:
        with self._lock:
            self.server_steps.pop(url, None)

    def _pick(self, start: int) -> str:
        """The server to try: the start-th in rotation among the serving ones that are up and have no recent
        failure, else the one whose last failure is oldest (a down server only when every serving one is down)."""
        now = time.monotonic()
        urls = self.serving()
        if not urls:
            raise RolloutError(f"no rollout server holds the pushed policy step {self.policy_step}")
        k = len(urls)
        rotation = [urls[(start + i) % k] for i in range(k)]
        with self._lock:
            up = [u for u in rotation if u not in self._down]
            rotation = up or rotation
            recent = {u: t for u, t in self._failed_at.items() if now - t < self.cooldown and u in rotation}
        healthy = [u for u in rotation if u not in recent]
        return healthy[0] if healthy else min(rotation, key=lambda u: recent[u])

    def _mark(self, url: str, ok: bool) -> None:
        with self._lock:
            if ok:
                self._failed_at.pop(url, None)
            else:
                self._failed_at[url] = time.monotonic()

    def is_down(self, url: str) -> bool:
        """Whether ``url`` failed a request and then a probe, and has not answered a re-probe since."""
        with self._lock:
            return _normalise(url) in self._down

    def _probe(self, url: str) -> bool:
        try:
            response = self._http.get(url + "/health", timeout=self.probe_timeout)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    def _failed(self, url: str) -> bool:
        """After a failed request to ``url``: probe it; mark it down (and start re-probing) unless it answers.
        Returns whether it is now down."""
        if self._probe(url):
            return False
        with self._lock:
            self._down.add(url)
            if self._prober is None or not self._prober.is_alive():
                self._prober = threading.Thread(target=self._reprobe, name="rollout-probe", daemon=True)
                self._prober.start()
        return True

    def _reprobe(self) -> None:
        """Background: re-probe down servers until none is down (or the client closes)."""
        while not self._closed.wait(self.probe_interval):
            with self._lock:
                down = sorted(self._down)
            if not down:
                return
            for url in down:
                if self._probe(url):
                    with self._lock:
                        self._down.discard(url)
                        self._failed_at.pop(url, None)

    def _recently_failed(self, url: str) -> bool:
        with self._lock:
            t = self._failed_at.get(url)
        return t is not None and time.monotonic() - t < self.cooldown

    def _call(self, url: str, method: str, path: str, body: dict | None) -> tuple[dict | None, str | None]:
        """One HTTP call: (payload, None) on success, (None, error) when retryable; raises on a 4xx."""
        try:
            response = self._http.request(method, url + path, json=body)
        except httpx.TransportError as exc:  # connect/read/write errors, timeouts, dropped connections
            return None, f"{type(exc).__name__}: {exc or 'no detail'}"
        if response.status_code >= 500:
            return None, f"HTTP {response.status_code}: {_message(response)}"
        if response.status_code >= 400:
            status = response.status_code
            raise RolloutRequestError(f"{url}{path} rejected the request (HTTP {status}): {_message(response)}")
        try:
            return response.json(), None
        except ValueError:
            return None, f"HTTP {response.status_code} with a body that is not JSON: {response.text[:200]!r}"

    def _request(
        self,
        method: str,
        path: str,
        body: dict | None,
        start: int = 0,
        pin: str | None = None,
        check_step: bool = False,
    ) -> tuple[str, dict]:
        """Send with fail-over (or only to ``pin``), backoff and retries; returns (server, payload)."""
        errors: list[str] = []
        failures = 0
        for attempt in range(self.max_attempts):
            try:
                url = pin or self._pick(start)
            except RolloutError as exc:  # every server is stale: say why they became so
                raise RolloutError("; ".join([str(exc), *errors])) from None
            if pin is not None and self.is_down(pin):
                errors.append(f"{pin}: marked down (failed a request and a health probe)")
                break
            if attempt > 0 and (pin is not None or self._recently_failed(url)):
                time.sleep(min(self.max_backoff, self.backoff * 2 ** max(0, failures - 1)))
            payload, error = self._call(url, method, path, body)
            stale = False
            if error is None and check_step:
                error = self._stale(url, payload)
                stale = error is not None
            if error is None:
                self._mark(url, True)
                return url, payload
            errors.append(f"{url}: {error}")
            failures += 1
            self._mark(url, False)
            transport = not stale and not error.startswith("HTTP ")  # no answer at all (a 5xx is an answer)
            if transport and not self.is_down(url) and self._failed(url):
                failures = 0 if pin is None else failures  # another server is tried next without backoff
        tried = sorted({e.split(": ", 1)[0] for e in errors})
        detail = "; ".join(errors[-2 * len(self.urls) :])
        raise RolloutError(
            f"{method} {path} failed after {len(errors)} attempts on server(s) {', '.join(tried)}: {detail}"
        )

    def _stale(self, url: str, payload: dict) -> str | None:
        """None if ``payload`` comes from the pushed policy step; else mark the server stale and say why."""
        step = payload.get("policy_step") if isinstance(payload, dict) else None
        if not isinstance(step, int):
            return "the response carries no integer policy_step"
        with self._lock:
            pushed, pushing, window = self.policy_step, self.pushing, self.max_staleness
        if pushed is None or pushed - window <= step <= pushed or step == pushing:
            return None
        self._mark_stale(url)
        allowed = f"the pushed step {pushed}" if window == 0 else f"pushed steps {pushed - window}..{pushed}"
        return f"served policy step {step}, not {allowed} (stale until the next push)"

    def models(self, url: str, timeout: float = 10.0) -> dict | None:
        """One ``GET /v1/models`` without retries: the server's card, or None when it does not answer."""
        try:
            response = self._http.get(url + "/v1/models", timeout=timeout)
            return response.json() if response.status_code == 200 else None
        except (httpx.TransportError, ValueError):
            return None

    def post_once(self, url: str, path: str, body: dict, timeout: float) -> tuple[dict | None, str | None]:
        """One POST without retries (the push's join and update: retrying half a collective cannot help):
        ``(payload, None)``, or ``(None, error)`` for any failure, a 4xx included."""
        try:
            response = self._http.post(url + path, json=body, timeout=httpx.Timeout(timeout, connect=10.0))
        except httpx.TransportError as exc:
            return None, f"{type(exc).__name__}: {exc or 'no detail'}"
        if response.status_code != 200:
            return None, f"HTTP {response.status_code}: {_message(response)}"
        try:
            return response.json(), None
        except ValueError:
            return None, f"a body that is not JSON: {response.text[:200]!r}"

    # -------------------------------------------------------------------------------------------- public

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        *,
        stop_token_ids: Sequence[int] | None = None,
        ignore_eos: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions of each prompt (token ids), in prompt order, from pi_mix of the pushed policy step.

        ``seeds`` (instead of ``seed``): prompt ``i``'s own seed, e.g. ``prompt_seed(s, k)`` to redo prompt ``k`` of
        an earlier call with seed ``s`` exactly (the trainer regenerates stale completions so).
        """
        prompts = [list(p) for p in prompt_token_ids]
        if seeds is not None and (seed is not None or len(seeds) != len(prompts)):
            raise ValueError("generate: give seed or one seed per prompt (seeds), not both")
        if any(not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompts):
            raise ValueError("prompt_token_ids must be a list of non-empty lists of int token ids")
        if n < 1 or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got n={n}, max_tokens={max_tokens}")
        if top_p < 1.0:
            warnings.warn(
                f"top_p={top_p} < 1: completions come from a truncated pi_mix but carry log pi_mix before "
                "truncation, so the GRPO importance ratios are off-policy",
                stacklevel=2,
            )
        chunks = self._chunks(prompts, n, max_tokens, len(stop_token_ids or ()))
        with self._lock:
            first = self._next
            self._next += len(chunks)

        def one(c: int) -> list[list[Completion]]:
            chunk = chunks[c]
            body = {
                "model": self.model,
                "prompt": [prompts[i] for i in chunk],
                "n": n,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "logprobs": 1,
                "ignore_eos": ignore_eos,
            }
            if seeds is not None:
                body["seeds"] = [int(seeds[i]) for i in chunk]
            elif seed is not None:
                body["seeds"] = prompt_seeds(seed, chunk)
            if stop_token_ids:
                body["stop_token_ids"] = list(stop_token_ids)
            url, payload = self._request("POST", "/v1/completions", body, start=first + c, check_step=True)
            return self._parse(url, payload, len(chunk), n)

        return [group for groups in self._pool.map(one, range(len(chunks))) for group in groups]

    def _limit(self, key: str) -> int | None:
        """The tightest advertised ``key`` over the servers whose limits are known (None: none advertises it)."""
        values = [lim[key] for lim in self._limits.values() if isinstance(lim.get(key), int) and lim[key] > 0]
        return min(values) if values else None

    def _chunks(self, prompts: list[list[int]], n: int, max_tokens: int, stop_ids: int) -> list[range]:
        """Consecutive prompt ranges, one request each: at most ``prompts_per_request`` (and an even share per
        server) prompts, and within every server's ``max_prompts``, ``max_work_tokens`` and ``max_body_bytes``.
        A single prompt over a limit still goes alone (the server then says which limit)."""
        count = max(1, min(self.prompts_per_request, math.ceil(len(prompts) / len(self.urls))))
        count = min(count, self._limit("max_prompts") or count)
        work_cap, body_cap = self._limit("max_work_tokens"), self._limit("max_body_bytes")
        overhead = 512 + 12 * stop_ids  # the body's other fields
        chunks, lo = [], 0
        while lo < len(prompts):
            hi, work, size = lo, 0, overhead
            while hi < len(prompts) and hi - lo < count:
                p = prompts[hi]
                w = n * (len(p) + max_tokens)
                b = sum(len(str(t)) for t in p) + len(p) + 24  # compact JSON ids and commas, its seed, brackets
                if hi > lo and ((work_cap and work + w > work_cap) or (body_cap and size + b > body_cap)):
                    break
                work, size, hi = work + w, size + b, hi + 1
            chunks.append(range(lo, hi))
            lo = hi
        return chunks

    @staticmethod
    def _parse(url: str, payload: dict, prompts: int, n: int) -> list[list[Completion]]:
        """The ``n`` completions of each of ``prompts`` prompts from a response (choice ``index = prompt * n + j``)."""
        try:
            choices = sorted(payload["choices"], key=lambda c: c["index"])
            out = [
                Completion(
                    token_ids=[int(t) for t in c["token_ids"]],
                    logprobs=[float(x) for x in c["logprobs"]["token_logprobs"]],
                    text=c.get("text") or "",
                    finish_reason=c["finish_reason"],
                    policy_step=int(payload["policy_step"]),
                    server=url,
                )
                for c in choices
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise RolloutError(f"{url} sent a malformed completions response ({exc!r})") from exc
        if len(out) != prompts * n or any(len(c.token_ids) != len(c.logprobs) for c in out):
            raise RolloutError(
                f"{url} sent {len(out)} choices (asked {prompts} prompts x {n}) or token ids without one log-prob each"
            )
        return [out[k * n : (k + 1) * n] for k in range(prompts)]

    def load_weights(self, path: str, step: int) -> dict[str, int]:
        """Make every server serve the policy in ``path`` (inside the servers' ``--weights-root``) as ``step``.

        Requests carry this client's ``run_id``: a server refuses (409) a step not above the last one it loaded for
        this client, so a late push can never roll a server back.

        Servers that cannot be reached after the retries are reported in a warning and are stale (no requests)
        until weights land in them again; if no server loads them, RolloutError.
        """
        # Absolute: the caller means its own working directory (servers resolve relative paths against their root).
        body = {"path": os.path.abspath(path), "step": int(step), "run_id": self.run_id}

        def push(url: str):
            try:
                return url, self._request("POST", "/v1/load_weights", body, pin=url)[1], None
            except RolloutRequestError:
                raise
            except RolloutError as exc:
                return url, None, exc

        loaded, failed = {}, []
        for url, payload, error in self._pool.map(push, self.urls):
            if error is None:
                loaded[url] = int(payload.get("policy_step", -1))
            else:
                failed.append(f"{url} ({error})")
        if not loaded:
            raise RolloutError(f"no server loaded step {step} from {path}: {'; '.join(failed)}")
        self.mark_pushed(step, list(loaded))
        if failed:
            missed = "; ".join(failed)
            warnings.warn(f"step {step} not loaded by: {missed}; they get no requests until it lands", stacklevel=2)
        return loaded

    def check(self, ref_weight: float, dtype: str | None = None) -> dict[str, dict]:
        """Refuse (RolloutError) unless every server serves pi_mix with the trainer's ``ref_weight`` and, when
        ``dtype`` is given (e.g. ``"float32"``), in that dtype (its ``/v1/models`` card reports ``dtype``);
        remember each server's advertised request limits (``generate`` sizes its requests to them)."""

        def models(url: str):
            return url, self._request("GET", "/v1/models", None, pin=url)[1]

        infos = dict(self._pool.map(models, self.urls))
        for url, info in infos.items():
            limits = info.get("limits") if isinstance(info, dict) else None
            if isinstance(limits, dict):
                self._limits[url] = limits
        wrong = []
        for url, info in infos.items():
            served = info.get("ref_weight") if isinstance(info, dict) else None
            if not isinstance(served, (int, float)) or not math.isclose(served, ref_weight, rel_tol=0, abs_tol=1e-9):
                wrong.append(f"{url} serves ref_weight={served}")
            card = (info.get("data") or [{}])[0] if isinstance(info, dict) else {}
            if dtype is not None and (card.get("dtype") if isinstance(card, dict) else None) != dtype:
                wrong.append(f"{url} serves dtype={card.get('dtype') if isinstance(card, dict) else None}")
        if wrong:
            raise RolloutError(
                f"refusing rollout servers whose pi_mix differs from the trainer's (ref_weight={ref_weight}"
                + (f", dtype={dtype}" if dtype is not None else "")
                + "): "
                + "; ".join(wrong)
                + (" (set rollout.allow_dtype_mismatch: true if the dtype difference is intended)" if dtype else "")
            )
        return infos
