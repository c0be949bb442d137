"""Celery's settings for runctx workers and submitters; servers and names come from RUNCTX_* settings.

Importing this module starts nothing and migrates nothing (Flower and every worker process import
it): the broker URL is computed, and a worker resolves its servers when it starts
(`workers.celery_app`).
"""

from kombu import Exchange, Queue

from runctx.embedded import broker_transport_options, broker_url_for
from state.settings import get_settings

_settings = get_settings()

STEP_QUEUE = f"{_settings.key_prefix}.steps"
PERSIST_QUEUE = f"{_settings.key_prefix}.persist"

broker_url = broker_url_for(_settings)
# TLS (rediss://, amqps://): certificates and host names verified unless RUNCTX_BROKER_TLS says otherwise.
broker_use_ssl = _settings.broker_tls_options(broker_url)
broker_connection_retry_on_startup = True
broker_transport_options = {
    # Redis broker only: a message held by a worker whose main process died comes back after this
    # long. A step still running then is delivered again; its second run cannot apply twice.
    "visibility_timeout": _settings.visibility_timeout_s,
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    # Behind Sentinel (RUNCTX_REDIS_URL or RUNCTX_BROKER_URL sentinel://...): the master's name.
    **broker_transport_options(_settings),
}

# JSON only: a message never carries code, and never a context value either (ids and versions).
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# Crash safety: acknowledge after the step committed; a lost child requeues its step at once.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_ignore_result = True

# Flower and `celery events`: every step shows under a readable (shadow) name. No task-sent events:
# they carry the task's real name (runctx.step) and, reaching Flower after task-received, replace
# the readable one; and each costs the sender one more publish per step.
worker_send_task_events = _settings.task_events
task_send_sent_event = False
# Events and remote control keep Celery's own exchanges (celeryev, celery.pidbox), so that any
# Flower or `celery inspect` on the broker sees the workers; deployments that must not see each
# other use brokers (or Redis databases, RabbitMQ vhosts) of their own.

task_queues = (
    Queue(STEP_QUEUE, Exchange(STEP_QUEUE, type="direct"), routing_key=STEP_QUEUE),
    Queue(PERSIST_QUEUE, Exchange(PERSIST_QUEUE, type="direct"), routing_key=PERSIST_QUEUE),
)
task_default_queue = STEP_QUEUE
task_routes = {
    "runctx.step": {"queue": STEP_QUEUE, "routing_key": STEP_QUEUE},
    "runctx.write_behind": {"queue": PERSIST_QUEUE, "routing_key": PERSIST_QUEUE},
    "runctx.finalize": {"queue": PERSIST_QUEUE, "routing_key": PERSIST_QUEUE},
}
imports = ("workers.celery_tasks",)
worker_hijack_root_logger = False
