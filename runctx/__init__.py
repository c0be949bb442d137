"""runctx: distributed task workers on Celery with a three-tier RunContext store."""
