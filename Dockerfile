# One image for the hub and every agent role; docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KIRI_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY kiri ./kiri
COPY hub ./hub
COPY agents ./agents
COPY model ./model
COPY migrations ./migrations
# the CPU build of torch, pinned by constraints.txt; no CUDA packages
# with the [postgresql] extra (psycopg 3): the same image serves a SQLite file or a shared PostgreSQL
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt '.[postgresql]' \
    && useradd --create-home --uid 1000 kiri \
    && mkdir -p /data && chown kiri /data

USER kiri
VOLUME ["/data"]
EXPOSE 7746 7745
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7745/healthz', timeout=4)"
CMD ["kiri-hub", "serve", "--host", "0.0.0.0"]
