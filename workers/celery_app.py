"""The Celery app: `celery -A workers worker` finds it as ``workers.app``."""

from celery import Celery

app = Celery("runctx")
app.config_from_object("celeryconfig")

# Importing the signal handlers connects them: every pool process gets its own runtime.
import workers.process_state  # noqa: E402,F401
