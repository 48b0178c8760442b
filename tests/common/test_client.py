"""The HTTP client against a real teacher app served by uvicorn on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from opd import TeacherClient, TrainerClient
from opd.common.errors import ServiceError, ServiceUnavailable
from opd.common.process import free_port
from opd.common.settings import TrainerSettings
from opd.teacher.app import build_app
from opd.trainer.app import build_app as build_trainer_app


def serve(app) -> Iterator[str]:
    """Serves an app on loopback in a thread; its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def live_url(teacher_settings, hf_engine):
    yield from serve(build_app(teacher_settings, engine=hf_engine))


@pytest.fixture(scope="module")
def trainer_url(tmp_path_factory):
    settings = TrainerSettings(runs_dir=str(tmp_path_factory.mktemp("runs")), api_key=None)
    yield from serve(build_trainer_app(settings))


def test_round_robin_skips_a_dead_replica(live_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = TeacherClient([dead, live_url], retries=3, backoff=0.01)
    for _ in range(4):  # every other try lands on the dead URL first
        assert client.logprobs([{"token_ids": [3, 4, 5]}]).results[0].start == 1


def test_client_errors_are_not_retried_and_carry_the_message(live_url: str) -> None:
    client = TeacherClient(live_url, retries=3, backoff=5.0)
    began = time.monotonic()
    with pytest.raises(ServiceError) as err:
        client.logprobs([{"token_ids": [1, 2, 100000]}])
    assert time.monotonic() - began < 2.0  # no backoff sleeps on a 4xx
    assert err.value.status_code == 422 and "vocabulary" in err.value.message


def test_unreachable_service_gives_up_with_service_unavailable() -> None:
    client = TeacherClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01)
    with pytest.raises(ServiceUnavailable, match="gave up after 3 tries"):
        client.info()


def test_request_dicts_are_validated_before_sending(live_url: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TeacherClient(live_url).logprobs([{"token_ids": [1]}])


def test_the_trainer_client_lists_runs_and_names_errors(trainer_url: str) -> None:
    client = TrainerClient(trainer_url, retries=0)
    assert client.runs().runs == []
    with pytest.raises(ServiceError) as err:
        client.run("no-such-run")
    assert err.value.status_code == 404 and "no-such-run" in err.value.message
    with pytest.raises(ServiceError) as err:
        client.start_run({"steps": "many"})
    assert err.value.status_code == 422


def test_replica_urls_expand_only_multi_address_names(monkeypatch) -> None:
    import socket

    from opd.common.client import replica_urls

    assert replica_urls("http://127.0.0.1:8001") == ["http://127.0.0.1:8001"]
    assert replica_urls("http://localhost:8001") == ["http://localhost:8001"]
    assert replica_urls("http://no-such-host.invalid:8001") == ["http://no-such-host.invalid:8001"]
    # A scaled compose service: Docker's DNS answers one address per replica.
    fake = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 8001)) for ip in ("172.18.0.3", "172.18.0.2", "172.18.0.3")]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: fake)
    assert replica_urls("http://teacher:8001/") == ["http://172.18.0.2:8001/", "http://172.18.0.3:8001/"]
    assert TeacherClient("http://teacher:8001", expand_dns=True).urls == ["http://172.18.0.2:8001", "http://172.18.0.3:8001"]


def test_one_client_serves_many_threads_and_reopens_after_close(live_url: str) -> None:
    """The sync client keeps one connection pool for its life (a pool per request cost an SSL context, tens of
    ms of CPU, each time), shared by threads; `close()` ends it and a later request opens a new one."""
    from concurrent.futures import ThreadPoolExecutor

    with TeacherClient(live_url, retries=0) as client:
        ask = lambda n: client.logprobs([{"token_ids": list(range(3, 3 + n))}]).results[0].logprobs  # noqa: E731
        with ThreadPoolExecutor(8) as pool:
            lengths = [len(lp) for lp in pool.map(ask, [2 + i % 5 for i in range(40)])]
        assert lengths == [1 + i % 5 for i in range(40)]
        pool_before = client._client()
        client.close()
        assert len(ask(4)) == 3 and client._client() is not pool_before
    assert client._http is None  # the with block closed it
