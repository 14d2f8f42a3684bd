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
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt . \
    && useradd --create-home --uid 1000 kiri \
    && mkdir -p /data && chown kiri /data

USER kiri
VOLUME ["/data"]
EXPOSE 7746
CMD ["kiri-hub", "serve", "--host", "0.0.0.0"]
