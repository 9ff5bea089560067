"""Notifications on open / action / escalation / resolve: an outgoing webhook and SMTP e-mail.

Sent from a small thread pool so that a slow receiver never holds up the loop; a failure is
logged and counted, never raised."""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from email.message import EmailMessage
from typing import Any

import requests

from controlplane.config import Settings
from controlplane.logsafe import printable
from controlplane.metrics import Metrics

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="notify")

    def notify(self, event: str, subject: str, body: Mapping[str, Any]) -> list[Future[None]]:
        futures = []
        if self.settings.notify_webhook_url:
            futures.append(self.pool.submit(self._webhook, event, subject, body))
        if self.settings.smtp_host and self.settings.smtp_to:
            futures.append(self.pool.submit(self._email, event, subject, body))
        return futures

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
