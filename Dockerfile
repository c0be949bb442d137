FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY state ./state
COPY tasks ./tasks
COPY workers ./workers
COPY runctx ./runctx
COPY examples ./examples
RUN pip install --no-cache-dir . "flower==2.2.0"
RUN useradd --create-home runctx
USER runctx
CMD ["celery", "-A", "workers", "worker", "-l", "INFO"]
