"""An unreachable broker or result backend stops a command within jobs.connect_timeout_s with
exit 2 naming the field and the URL (password masked), instead of Celery retrying for ever."""

from __future__ import annotations

import socket
import time

import pytest

from jobs.app import check_services
from jobs.executor import open_executor
from pipeline.config import resolve_config
from pipeline.errors import UserError
from pipeline.workspace import Workspace
from tests.conftest import nucleus

TIMEOUT_S = 1.0
MARGIN_S = 2.0  # the last refused attempt, the retry pause and connection teardown


def closed_port() -> int:
    """A local port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dir(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "run")
    ws.begin_command(resolve_config(None, None, None), "test", False)  # meta.json: a run directory
    return ws


def expect_unreachable(ws: Workspace, field: str, url: str) -> str:
    cfg = resolve_config(None, None, [f"{field}={url}", f"jobs.connect_timeout_s={TIMEOUT_S}"])
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        check_services(cfg, ws)
    elapsed = time.monotonic() - t0
    assert elapsed < TIMEOUT_S + MARGIN_S, f"gave up after {elapsed:.1f} s"
    msg = str(err.value)
    assert msg.startswith(f"{field}: cannot reach ") and f"within {TIMEOUT_S:g} s" in msg
    assert "secret" not in msg
    return msg


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_an_unreachable_broker_fails_in_time_naming_the_masked_url(tmp_path, scheme):
    port = closed_port()
    url = {"redis": f"redis://:secret@127.0.0.1:{port}/0", "amqp": f"amqp://guest:secret@127.0.0.1:{port}//"}[scheme]
    msg = expect_unreachable(run_dir(tmp_path), "jobs.broker_url", url)
    assert f"127.0.0.1:{port}" in msg and "leave jobs.broker_url empty" in msg


def test_a_broker_that_accepts_and_never_answers_fails_in_time(tmp_path):
    with socket.socket() as srv:  # the kernel completes the TCP handshake; nobody ever speaks
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        port = srv.getsockname()[1]
        for url in (f"redis://127.0.0.1:{port}/0", f"amqp://guest:secret@127.0.0.1:{port}//"):
            assert f"127.0.0.1:{port}" in expect_unreachable(run_dir(tmp_path), "jobs.broker_url", url)


def test_an_unreachable_result_backend_fails_in_time_naming_the_masked_url(tmp_path):
    port = closed_port()
    msg = expect_unreachable(run_dir(tmp_path), "jobs.result_backend", f"redis://:secret@127.0.0.1:{port}/1")
    assert f"127.0.0.1:{port}" in msg and "jobs.result_backend" in msg


@pytest.mark.parametrize("broker", ["redis://127.0.0.1:6379/0", "amqp://guest:guest@127.0.0.1:5672//"])
def test_reachable_real_services_pass(tmp_path, broker):
    cfg = resolve_config(None, None, [f"jobs.broker_url={broker}", "jobs.result_backend=redis://127.0.0.1:6379/1",
                                      f"jobs.connect_timeout_s={TIMEOUT_S}"])
    check_services(cfg, run_dir(tmp_path))


def test_embedded_transport_and_file_results_need_no_server(tmp_path):
    check_services(resolve_config(None, None, None), run_dir(tmp_path))


def test_the_celery_executor_checks_before_starting_workers(tmp_path):
    ws = run_dir(tmp_path)
    cfg = resolve_config(None, None, [f"jobs.broker_url=redis://127.0.0.1:{closed_port()}/0",
                                      f"jobs.connect_timeout_s={TIMEOUT_S}"])
    with pytest.raises(UserError, match="jobs.broker_url: cannot reach"):
        open_executor(cfg, ws, workers=2)
    assert not (ws.logs_dir / "workers").exists()  # no local worker was started


def test_nucleus_worker_exits_2_naming_the_broker_url(tmp_path):
    ws = run_dir(tmp_path)
    port = closed_port()
    t0 = time.monotonic()
    out = nucleus("worker", "--run-dir", str(ws.root), "--set", f"jobs.broker_url=redis://:secret@127.0.0.1:{port}/0",
                  "--set", f"jobs.connect_timeout_s={TIMEOUT_S}", timeout=60)
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - t0 < 15
    assert "Traceback" not in out.stderr and "secret" not in out.stderr
    assert f"jobs.broker_url: cannot reach the broker at 'redis://:**@127.0.0.1:{port}/0'" in out.stderr
