"""Notifications on open / action / escalation / resolve: an outgoing webhook and SMTP e-mail.

Sent from a small thread pool so that a slow receiver never holds up the loop; a failure is
logged and counted, never raised. At most MAX_PENDING wait to be sent: beyond that (a
receiver hanging through a storm of incidents), a new one is dropped, counted and logged,
instead of memory growing without bound."""

from __future__ import annotations

import logging
import smtplib
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from email.message import EmailMessage
from typing import Any

import requests

from controlplane.config import Settings
from controlplane.logsafe import printable
from controlplane.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_PENDING = 1000  # notifications waiting for a sender, across channels


class Notifier:
    def __init__(self, settings: Settings, metrics: Metrics, max_pending: int = MAX_PENDING):
        self.settings = settings
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="notify")
        self.max_pending = max_pending
        self._pending = 0
        self._lock = threading.Lock()

    def notify(self, event: str, subject: str, body: Mapping[str, Any]) -> list[Future[None]]:
        futures = []
        if self.settings.notify_webhook_url:
            futures += self._submit("webhook", self._webhook, event, subject, body)
        if self.settings.smtp_host and self.settings.smtp_to:
            futures += self._submit("email", self._email, event, subject, body)
        return futures

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def _submit(
        self, channel: str, send: Any, event: str, subject: str, body: Mapping[str, Any]
    ) -> list[Future[None]]:
        with self._lock:
            if self._pending >= self.max_pending:
                full = True
            else:
                full = False
                self._pending += 1
        if full:
            self.metrics.notifications.labels(channel, "dropped").inc()
            logger.error(
                "notification %s dropped (%s): %d already wait for a %s receiver that is slow "
                "or hanging", event, printable(subject, limit=120), self.max_pending, channel,
            )  # fmt: skip
            return []
        future: Future[None] = self.pool.submit(send, event, subject, body)
        future.add_done_callback(self._sent)
        return [future]

    def _sent(self, _: Future[None]) -> None:
        with self._lock:
            self._pending -= 1

    def _webhook(self, event: str, subject: str, body: Mapping[str, Any]) -> None:
        try:
            response = requests.post(
                self.settings.notify_webhook_url,
                json={"event": event, "subject": subject, **body},
                timeout=5,
            )
            response.raise_for_status()
            self.metrics.notifications.labels("webhook", "sent").inc()
        except requests.RequestException as exc:
            self.metrics.notifications.labels("webhook", "failed").inc()
            logger.warning("notification webhook failed: %s", exc)

    def _email(self, event: str, subject: str, body: Mapping[str, Any]) -> None:
        try:
            message = EmailMessage()
            message["From"] = self.settings.smtp_from
            message["To"] = self.settings.smtp_to
            # One header line: a summary from outside (an alert's) may hold a newline, which
            # the header refuses (and must not forge another header), or a lone surrogate.
            message["Subject"] = printable(f"[{event}] {subject}", limit=200)
            message.set_content(
                "\n".join(f"{printable(key)}: {printable(value)}" for key, value in body.items())
            )
            with smtplib.SMTP(self.settings.smtp_host, self.settings.smtp_port, timeout=5) as smtp:
                smtp.send_message(message)
            self.metrics.notifications.labels("email", "sent").inc()
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            self.metrics.notifications.labels("email", "failed").inc()
            logger.warning("notification e-mail failed: %s", exc)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
