"""Gunicorn hooks: resolve this instance's own in-doubt transactions before serving."""

from __future__ import annotations

import logging
from typing import Any

from shop.recovery import resolve_own_in_doubt

logger = logging.getLogger("shop.gunicorn")

# gthread, but a request is read whole by the worker's event loop before a thread serves it:
# slow clients cannot hold the threads (shop/worker.py).
worker_class = "shop.worker.BufferedThreadWorker"
workers = 1
threads = 16
graceful_timeout = 5
timeout = 30


def on_starting(server: Any) -> None:
    # In the master, before any worker exists: none of this instance's transactions is in
    # flight, so every prepared one it owns was left by a crash and can be settled now.
    resolve_own_in_doubt()
