"""Celery workers: the app, worker bootstrap, each process's L1 and runtime, and the control channel."""

from workers.celery_app import app

__all__ = ["app"]
