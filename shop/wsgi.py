"""The WSGI entry point: `gunicorn shop.wsgi:app`, configured from SHOP_* variables."""

from __future__ import annotations

import logging

from shop.app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app()
