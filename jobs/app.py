"""The Celery app of a run, built from its `jobs` config section.

With the defaults nothing needs a server: messages go through Celery's `filesystem://`
transport in `<run>/queue/messages` (one folder in and out, claimed messages kept in
`queue/processed`), and results are files in `<run>/queue/results`. Set `jobs.broker_url` to
`redis://...` or `amqp://...` for workers on other machines (the run directory is then on
shared storage, mounted at the same path everywhere).

Every setting that keeps a job from being lost or run on untrusted input is here: JSON only,
late acknowledgement, requeue when a worker dies, one message reserved per worker process,
time limits, and a Redis `visibility_timeout` above the longest job (a shorter one would hand a
running job to a second worker). The orchestrator's job ledger covers what a transport still
loses (ENV.md: the filesystem transport drops the message of a killed worker).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from pathlib import Path

import kombu
import kombu.transport
from celery import Celery
from celery.backends.filesystem import FilesystemBackend
from kombu.transport import filesystem as kombu_fs
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import str_to_bytes
from kombu.utils.functional import retry_over_time
from kombu.utils.json import dumps
from kombu.utils.url import maybe_sanitize_url, url_to_parts

from pipeline.atomic import tmp_name
from pipeline.config import NucleusConfig
from pipeline.errors import UserError
from pipeline.workspace import Workspace

# Job kinds -> (Celery task name, queue). Expansions and embeddings are retrieval work (CPU or
# a small GPU share); training and evaluation hold a GPU each.
KINDS: dict[str, tuple[str, str]] = {
    "expand": ("nucleus.expand_neighborhood", "expand"),
    "train": ("nucleus.train_neighborhood", "train"),
    "evaluate": ("nucleus.evaluate_neighborhood", "train"),
    "embed": ("nucleus.embed_shard", "embed"),
    "ping": ("nucleus.ping", "expand"),  # an empty job: health checks and the overhead benchmark
}
QUEUES = ("expand", "train", "embed")
# Redis hands an unacknowledged message to another worker after this long: keep it above the
# longest job (its time limit) so a running job is never run twice by the broker itself.
VISIBILITY_MARGIN_S = 600


def queue_dir(ws: Workspace) -> Path:
    return ws.root / "queue"


def queue_prefix(cfg: NucleusConfig, ws: Workspace) -> str:
    """`jobs.queue_prefix`, or one derived from the run directory's path (the same on every
    machine that mounts the shared run directory at the same place)."""
    if cfg.jobs.queue_prefix:
        return cfg.jobs.queue_prefix
    name = re.sub(r"[^A-Za-z0-9_-]", "_", ws.root.name)[:40]
    return f"nucleus.{name}.{hashlib.sha1(str(ws.root).encode()).hexdigest()[:8]}"


def queue_name(cfg: NucleusConfig, ws: Workspace, queue: str) -> str:
    return f"{queue_prefix(cfg, ws)}.{queue}"


def is_embedded(cfg: NucleusConfig) -> bool:
    return not cfg.jobs.broker_url


def _broker(cfg: NucleusConfig, ws: Workspace) -> tuple[str, dict]:
    """The broker URL and transport options of the run (no folder is made here)."""
    j, qdir = cfg.jobs, queue_dir(ws)
    if is_embedded(cfg):
        return f"{EMBEDDED_SCHEME}://localhost/", {
            "data_folder_in": str(qdir / "messages"), "data_folder_out": str(qdir / "messages"),
            "store_processed": True, "processed_folder": str(qdir / "processed"),
            "control_folder": str(qdir / "control"), "polling_interval": j.poll_s}
    broker, options = j.broker_url, {"visibility_timeout": j.time_limit_s + VISIBILITY_MARGIN_S}
    if broker.startswith(("redis://", "rediss://")):
        broker = "nucleus" + broker  # the Redis transport below, same URL
        options.update(global_keyprefix=f"{queue_prefix(cfg, ws)}:", socket_timeout=10, socket_connect_timeout=5)
    return broker, options


def make_app(cfg: NucleusConfig, ws: Workspace) -> Celery:
    """A Celery app for this run: the same settings in the orchestrator and in every worker."""
    j = cfg.jobs
    qdir = queue_dir(ws)
    if is_embedded(cfg):
        for sub in ("messages", "processed", "control"):
            (qdir / sub).mkdir(parents=True, exist_ok=True)
    broker, transport_options = _broker(cfg, ws)
    if j.result_backend and not j.result_backend.startswith("file://"):
        backend = j.result_backend
    else:
        path = Path(j.result_backend[len("file://"):]) if j.result_backend else qdir / "results"
        path.mkdir(parents=True, exist_ok=True)
        backend = f"jobs.app:AtomicFileBackend+file://{path}"
    app = Celery(f"nucleus-{queue_prefix(cfg, ws)}", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_accept_content=["json"], event_serializer="json",
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_time_limit=j.time_limit_s, task_soft_time_limit=max(1, j.time_limit_s - 30),
        task_track_started=False,  # the task writes its own STARTED state, with heartbeats
        worker_pool_start_method="spawn",  # a prefork pool must not fork a process that holds CUDA
        # Reconnect for ever once running (a restarted broker loses no work); an unreachable broker
        # at the start is caught by `check_services` first, within jobs.connect_timeout_s.
        broker_transport_options=transport_options, broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None, broker_connection_timeout=5,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        result_backend_always_retry=True, result_backend_max_retries=20,
        worker_enable_remote_control=False, worker_send_task_events=False, task_send_sent_event=False,
        worker_hijack_root_logger=False, worker_redirect_stdouts=False,
        task_default_queue=queue_name(cfg, ws, "train"), result_expires=None,
    )
    return app


def check_services(cfg: NucleusConfig, ws: Workspace) -> None:
    """Reach the broker and the result backend, if they are servers, within
    `jobs.connect_timeout_s` seconds, or raise a UserError naming the field and the URL.

    Celery retries an unreachable broker for ever (the right thing mid-run, when a broker
    restarts: see `make_app`), so a command checks once, before it starts any work."""
    j, t = cfg.jobs, cfg.jobs.connect_timeout_s
    # Each attempt is bounded by the socket timeouts (a host that accepts TCP and never answers
    # too); refused attempts are retried for t seconds in all, so a broker still starting is fine.
    retry = {"timeout": t, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 0.5}
    if j.broker_url:
        # The app's own transport and options (the Redis key prefix, TLS), shorter timeouts; a
        # bare connection, so that a check makes no folder in the run directory.
        url, options = _broker(cfg, ws)
        conn = kombu.Connection(url, connect_timeout=t,
                                transport_options={**options, "socket_connect_timeout": t, "socket_timeout": t})
        try:
            with conn:
                conn.ensure_connection(max_retries=None, **retry)
        except Exception as e:
            raise _unreachable("jobs.broker_url", "the broker", j.broker_url, t, e) from None
    if j.result_backend.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(j.result_backend, socket_connect_timeout=t, socket_timeout=t)
        try:
            retry_over_time(client.ping, (redis.ConnectionError, redis.TimeoutError), **retry)
        except Exception as e:
            raise _unreachable("jobs.result_backend", "the result backend", j.result_backend, t, e) from None
        finally:
            client.close()


def _unreachable(field: str, what: str, url: str, t: float, e: Exception) -> UserError:
    reason = f"{type(e).__name__}: {str(e).rstrip('.')}"
    password = url_to_parts(url).password
    if password:  # never echo a password, even one a driver put in its error
        reason = reason.replace(password, "**")
    hint = ("leave jobs.broker_url empty for the embedded transport" if field == "jobs.broker_url"
            else "leave jobs.result_backend empty for result files in the run directory")
    return UserError(f"{field}: cannot reach {what} at '{maybe_sanitize_url(url)}' within {t:g} s ({reason}). "
                     f"Start it, fix the URL, or {hint}.")


# ------------------------------------------------------------------ atomic file storage


def _tmp(path: bytes) -> bytes:
    head, _, name = path.rpartition(b"/")
    return b"/".join((head, tmp_name(f"{threading.get_ident()}.").encode() + name))


class AtomicFileBackend(FilesystemBackend):
    """Celery's file result backend, but each result file is written by rename: a reader (the
    orchestrator polling) sees the old state or the new one, never a half-written file."""

    def set(self, key, value):
        path = self._filename(key)
        tmp = _tmp(path)
        with open(tmp, "wb") as f:
            f.write(value if isinstance(value, bytes) else str(value).encode())
        os.replace(tmp, path)


class _AtomicFilesystemChannel(kombu_fs.Channel):
    """kombu's filesystem channel, but a message file appears by rename: a worker listing the
    folder never claims a file that is still empty or half-written."""

    def _put(self, queue, payload, **kwargs):
        name = f"{int(round(kombu_fs.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        tmp = os.path.join(self.data_folder_out, tmp_name(str(uuid.uuid4())))
        try:
            with open(tmp, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(tmp, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise kombu_fs.ChannelError(f"Cannot add file {name!r} to directory") from exc


class AtomicFilesystemTransport(kombu_fs.Transport):
    Channel = _AtomicFilesystemChannel
    global_state = kombu_fs.virtual.BrokerState()


class _RedisQoS(kombu_redis.QoS):
    """Frees the message's prefetch slot even when its ack cannot reach Redis (Redis restarted
    while the job ran). Otherwise a worker with prefetch 1 never asks for another message, so it
    never notices the dead connection, and stalls for good. The unacknowledged message is then
    Redis's to restore (visibility timeout) or was lost with it; the ledger covers both."""

    def ack(self, delivery_tag):
        try:
            super().ack(delivery_tag)
        except Exception:
            if delivery_tag in self._delivered:
                virtual.QoS.ack(self, delivery_tag)
            raise


class _RedisChannel(kombu_redis.Channel):
    QoS = _RedisQoS


class RedisTransport(kombu_redis.Transport):
    Channel = _RedisChannel


EMBEDDED_SCHEME = "nucleusfs"
kombu.transport.TRANSPORT_ALIASES.setdefault(EMBEDDED_SCHEME, "jobs.app:AtomicFilesystemTransport")
kombu.transport.TRANSPORT_ALIASES.setdefault("nucleusredis", "jobs.app:RedisTransport")
kombu.transport.TRANSPORT_ALIASES.setdefault("nucleusrediss", "jobs.app:RedisTransport")
