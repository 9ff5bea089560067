"""The shop's gunicorn worker: each request is read whole before a thread serves it, so that
slow clients never hold the threads `/readyz` and orders need (httpworker)."""

from __future__ import annotations

from httpworker import WholeRequestWorker
from shop.app import MAX_BODY_BYTES


class BufferedThreadWorker(WholeRequestWorker):
    body_max_bytes = MAX_BODY_BYTES
    gather_budget_bytes = 16 * 1024 * 1024  # a thousand half-sent orders' worth
    stopping_message = "the shop instance is stopping"
