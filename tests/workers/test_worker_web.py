"""The worker's web server: Ferry's own pages only, on the address the settings name.

Faust's built-in views would serve any job's state (``/table/jobs/<id>/``: its result and its
owner's key fingerprint) and the cluster's addresses (``/router/``) to anyone who reaches the
port; the worker must answer 404 there and serve only its health pages.
"""

from __future__ import annotations

import aiohttp
import pytest

from app.settings import Settings
from deploy.processes import free_port
from tests.helpers import CHAT, submit, wait_until, worker_with_web
from workers.faust_layer import create_app

FAUST_VIEWS = ["/", "/table/", "/table/jobs/", "/router/", "/router/jobs/", "/router/topics", "/graph/",
               "/stats/", "/assignment/", "/performance/", "/signal/"]


@pytest.mark.timeout(180)
async def test_only_ferrys_pages_answer_on_the_worker_port(api, ferry_settings: Settings) -> None:
    port = free_port()
    settings = ferry_settings.model_copy(update={"worker_web_port": port})
    async with worker_with_web(settings) as worker, \
            aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as web:
        assert worker.app.conf.web_bind == "127.0.0.1"
        job_id = (await submit(api, {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                               headers={"x-bf-vk": "sk-bf-alice"}))["id"]

        async def completed() -> bool:
            response = await api.get(f"{CHAT}/{job_id}", headers={"x-bf-vk": "sk-bf-alice"})
            return response.status == 200 and (await response.json())["status"] == "completed"

        await wait_until(completed, 60, "the job to complete")
        assert worker.get(job_id) is not None  # the job is in this worker's table

        async def health_ok() -> bool:
            async with web.get("/health") as response:
                return response.status == 200 and (await response.json())["status"] == "ok"

        await wait_until(health_ok, 30, "the worker's /health")
        async with web.get("/health/ready") as ready:
            assert ready.status in (200, 503) and "status" in await ready.json()
        for path in [f"/table/jobs/{job_id}/", f"/router/jobs/{job_id}/", *FAUST_VIEWS]:
            for method in ("GET", "POST"):
                async with web.request(method, path) as response:
                    body = await response.text()
                    assert response.status == 404, (method, path, response.status, body)
                    assert job_id not in body


def test_faust_reads_nothing_from_the_environment(monkeypatch, tmp_path) -> None:
    # Faust gives its own variables precedence over the values Ferry passes; none may apply.
    for name, value in {"WEB_BIND": "0.0.0.0", "WEB_PORT": "7777", "APP_WEB_TABLES_ENABLED": "true",
                        "APP_WEB_ROUTER_ENABLED": "true", "APP_WEB_STATS_ENABLED": "true",
                        "APP_DEBUG": "true", "BROKER_URL": "kafka://elsewhere:9092"}.items():
        monkeypatch.setenv(name, value)
    app = create_app(Settings(kafka_bootstrap_servers="127.0.0.1:9", worker_data_dir=str(tmp_path),
                              worker_web_port=6123))
    conf = app.conf
    assert (conf.web_bind, conf.web_port) == ("127.0.0.1", 6123)
    assert not conf.debug
    assert [str(url) for url in conf.broker] == ["kafka://127.0.0.1:9"]
    assert app.web.blueprints._enabled == []  # no Faust view at all


def test_the_bind_address_is_a_setting(tmp_path) -> None:
    settings = Settings(kafka_bootstrap_servers="127.0.0.1:9", worker_data_dir=str(tmp_path),
                        worker_web_host="0.0.0.0")
    assert create_app(settings).conf.web_bind == "0.0.0.0"
    assert Settings().worker_web_host == "127.0.0.1"
