"""HTTP clients for the opd services, sync and async, over httpx.

    from opd import TeacherClient
    teacher = TeacherClient("http://127.0.0.1:8001", api_key="...")
    result = teacher.logprobs([{"token_ids": ids, "start": n}]).results[0].logprobs

Choices:
1) Connection errors, timeouts and 502/503/504 are retried with exponential
   backoff (honouring Retry-After) up to `retries` times, then raise
   `ServiceUnavailable`; every other error raises `ServiceError` at once with
   the service's own message.
2) Several base URLs are used round robin (teacher replicas); a failing URL
   moves the next try to the next one. With `expand_dns=True`, a host name
   that resolves to several IPv4 addresses (a scaled compose service) counts
   as one replica per address.
3) Requests and responses are the protocol models; a dict is accepted where a
   request model is expected and validated before it is sent.
4) This module needs httpx and pydantic only (`pip install opd` without
   extras): no torch, transformers or vLLM. Clients for stock vLLM and SGLang
   servers as teachers are in compat_client.py.
5) A sync client given a `cancel` event ends its retry pauses as soon as the
   event is set (a trainer run asked to stop does not sit out the backoff).
6) `received_bytes` counts the bodies of the successful responses the client
   has read (what a teacher's scores and top-k cost on the wire; the trainer
   records it per step).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import socket
import threading
import time
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel

from opd.common import protocol as p
from opd.common.errors import ServiceError, ServiceUnavailable

R = TypeVar("R", bound=BaseModel)
S = TypeVar("S", bound="SyncClient")
RETRY_STATUS = {502, 503, 504}


class _Base:
    def __init__(
        self,
        urls: str | list[str],
        *,
        api_key: str | None = None,
        timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        expand_dns: bool = False,
        cancel: threading.Event | None = None,
    ) -> None:
        self.urls = [u.rstrip("/") for u in ([urls] if isinstance(urls, str) else urls)]
        if expand_dns:
            self.urls = [r for u in self.urls for r in replica_urls(u)]
        if not self.urls:
            raise ValueError("at least one base URL is needed")
        self._next_url = itertools.cycle(range(len(self.urls)))
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout, connect=min(10.0, timeout))
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cancel = cancel or threading.Event()
        self.received_bytes = 0  # (6)
        self._counting = threading.Lock()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None and (after := response.headers.get("Retry-After")):
            try:
                return min(float(after), self.max_backoff)
            except ValueError:
                pass
        return min(self.backoff * 2**attempt, self.max_backoff)

    @staticmethod
    def _message(response: httpx.Response) -> str:
        """opd's `detail`, or the `error.message` of vLLM and SGLang servers, or the body."""
        try:
            body = response.json()
        except ValueError:
            return response.text
        if not isinstance(body, dict):
            return response.text
        error = body.get("error")
        detail = body.get("detail", error.get("message", error) if isinstance(error, dict) else error or response.text)
        return detail if isinstance(detail, str) else str(detail)

    def _check(self, response: httpx.Response, model: type[R] | None) -> Any:
        if response.is_success:
            with self._counting:
                self.received_bytes += len(response.content)
            return model.model_validate_json(response.content) if model else response.json()
        raise ServiceError(response.status_code, self._message(response), str(response.request.url))


def replica_urls(url: str) -> list[str]:
    """One URL per IPv4 address of the URL's host; the URL itself when there is one or none."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    try:
        ipaddress.ip_address(host or "")
        return [url]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return [url]  # not resolvable yet: the retries will find it when it is up
    addresses = sorted({info[4][0] for info in infos})
    if len(addresses) < 2:
        return [url]
    return [urlunsplit(parts._replace(netloc=f"{a}:{port}")) for a in addresses]


def _encode(body: BaseModel | dict | None) -> str | None:
    if body is None:
        return None
    return json.dumps(body) if isinstance(body, dict) else body.model_dump_json(exclude_none=True)


class SyncClient(_Base):
    """One httpx.Client (its connection pool and SSL context) for the client's life, shared by threads (httpx's
    Client is thread-safe): building one per request cost some 30-80 ms of CPU each. `close()` or `with` ends it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http: httpx.Client | None = None
        self._lock = threading.Lock()

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                self._http = httpx.Client(timeout=self.timeout, headers=self.headers)
            return self._http

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: BaseModel | dict | None = None, model: type[R] | None = None) -> Any:
        content = _encode(body)
        last: str = ""
        tries = 0
        http = self._client()
        for attempt in range(self.retries + 1):
            tries += 1
            url = self.urls[next(self._next_url)] + path
            response = None
            try:
                response = http.request(method, url, content=content, headers={"content-type": "application/json"})
                if response.status_code not in RETRY_STATUS:
                    return self._check(response, model)
                last = f"HTTP {response.status_code}: {self._message(response)}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries and self.cancel.wait(self._delay(attempt, response)):
                break
        raise ServiceUnavailable(503, f"gave up after {tries} tries; last: {last}", self.urls[0] + path)

    def info(self) -> p.ServiceInfo:
        return self.request("GET", "/info", model=p.ServiceInfo)

    def ready(self) -> bool:
        try:
            return all(self._client().get(u + "/ready", timeout=5.0).status_code == 200 for u in self.urls)
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 600.0, interval: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise ServiceUnavailable(503, f"not ready after {timeout:.0f}s", self.urls[0])
            time.sleep(interval)


class AsyncClient(_Base):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http: httpx.AsyncClient | None = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
            self._http = httpx.AsyncClient(timeout=self.timeout, headers=self.headers, limits=limits)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def request(self, method: str, path: str, body: BaseModel | dict | None = None, model: type[R] | None = None) -> Any:
        content = _encode(body)
        last = ""
        for attempt in range(self.retries + 1):
            url = self.urls[next(self._next_url)] + path
            response = None
            try:
                response = await self._client().request(
                    method, url, content=content, headers={"content-type": "application/json"}
                )
                if response.status_code not in RETRY_STATUS:
                    return self._check(response, model)
                last = f"HTTP {response.status_code}: {self._message(response)}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries:
                await asyncio.sleep(self._delay(attempt, response))
        raise ServiceUnavailable(503, f"gave up after {self.retries + 1} tries; last: {last}", self.urls[0] + path)

    async def info(self) -> p.ServiceInfo:
        return await self.request("GET", "/info", model=p.ServiceInfo)


def _as(model: type[R], body: R | dict) -> R:
    return body if isinstance(body, model) else model.model_validate(body)


class TeacherClient(SyncClient):
    def logprobs(self, sequences: list[p.ScoreSequence | dict], top_k: int = 0, temperature: float = 1.0) -> p.LogprobsResponse:
        body = p.LogprobsRequest(sequences=[_as(p.ScoreSequence, s) for s in sequences], top_k=top_k, temperature=temperature)
        return self.request("POST", "/logprobs", body, p.LogprobsResponse)

    def render(self, prompts: list[p.Prompt | dict]) -> p.RenderResponse:
        """The ids each prompt renders to under the teacher's tokenizer and chat template."""
        body = p.RenderRequest(prompts=[_as(p.Prompt, x) for x in prompts])
        return self.request("POST", "/render", body, p.RenderResponse)


class AsyncTeacherClient(AsyncClient):
    async def logprobs(self, sequences: list[p.ScoreSequence | dict], top_k: int = 0, temperature: float = 1.0) -> p.LogprobsResponse:
        body = p.LogprobsRequest(sequences=[_as(p.ScoreSequence, s) for s in sequences], top_k=top_k, temperature=temperature)
        return await self.request("POST", "/logprobs", body, p.LogprobsResponse)

    async def render(self, prompts: list[p.Prompt | dict]) -> p.RenderResponse:
        """The ids each prompt renders to under the teacher's tokenizer and chat template."""
        body = p.RenderRequest(prompts=[_as(p.Prompt, x) for x in prompts])
        return await self.request("POST", "/render", body, p.RenderResponse)


class StudentClient(SyncClient):
    def rollouts(self, request: p.RolloutRequest | dict) -> p.RolloutResponse:
        return self.request("POST", "/rollouts", _as(p.RolloutRequest, request), p.RolloutResponse)

    def load_weights(self, request: p.WeightsRequest | dict) -> p.WeightsResponse:
        return self.request("POST", "/weights", _as(p.WeightsRequest, request), p.WeightsResponse)


class AsyncStudentClient(AsyncClient):
    async def rollouts(self, request: p.RolloutRequest | dict) -> p.RolloutResponse:
        return await self.request("POST", "/rollouts", _as(p.RolloutRequest, request), p.RolloutResponse)

    async def load_weights(self, request: p.WeightsRequest | dict) -> p.WeightsResponse:
        return await self.request("POST", "/weights", _as(p.WeightsRequest, request), p.WeightsResponse)


class TrainerClient(SyncClient):
    """Runs on a trainer service: a run's body is the run config as a dict (the YAML's content)."""

    def start_run(self, config: dict) -> p.RunCreated:
        return self.request("POST", "/runs", config, p.RunCreated)

    def runs(self) -> p.RunList:
        return self.request("GET", "/runs", model=p.RunList)

    def run(self, run_id: str) -> p.RunStatus:
        return self.request("GET", f"/runs/{run_id}", model=p.RunStatus)

    def run_metrics(self, run_id: str) -> p.RunMetrics:
        return self.request("GET", f"/runs/{run_id}/metrics", model=p.RunMetrics)

    def stop_run(self, run_id: str) -> p.RunStatus:
        return self.request("POST", f"/runs/{run_id}/stop", model=p.RunStatus)

    def info(self) -> p.TrainerInfo:  # type: ignore[override]  # the trainer serves no model: its own answer
        return self.request("GET", "/info", model=p.TrainerInfo)


class AsyncTrainerClient(AsyncClient):
    async def start_run(self, config: dict) -> p.RunCreated:
        return await self.request("POST", "/runs", config, p.RunCreated)

    async def runs(self) -> p.RunList:
        return await self.request("GET", "/runs", model=p.RunList)

    async def run(self, run_id: str) -> p.RunStatus:
        return await self.request("GET", f"/runs/{run_id}", model=p.RunStatus)

    async def run_metrics(self, run_id: str) -> p.RunMetrics:
        return await self.request("GET", f"/runs/{run_id}/metrics", model=p.RunMetrics)

    async def stop_run(self, run_id: str) -> p.RunStatus:
        return await self.request("POST", f"/runs/{run_id}/stop", model=p.RunStatus)

    async def info(self) -> p.TrainerInfo:  # type: ignore[override]  # the trainer serves no model: its own answer
        return await self.request("GET", "/info", model=p.TrainerInfo)
