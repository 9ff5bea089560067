"""Executors: where actions act (local processes now; SSH or systemd later)."""
