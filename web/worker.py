"""The control plane's gunicorn worker: each request is read whole before a thread serves it,
so that slow clients never hold the threads the API, `/readyz` and the webhook need
(httpworker)."""

from __future__ import annotations

from httpworker import WholeRequestWorker
from web.body import MAX_BODY_BYTES


class BufferedThreadWorker(WholeRequestWorker):
    body_max_bytes = MAX_BODY_BYTES
    gather_budget_bytes = 64 * 1024 * 1024  # a webhook may be 4 MiB
    stopping_message = "the control plane is stopping"
