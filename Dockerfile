# syntax=docker/dockerfile:1
# One image for the API, the Celery worker, beat and the one-shot init (see docker/entrypoint.sh).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# The same lock file `make` installs from (requirements-dev.lock starts with `-r requirements.lock`).
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY ledger ./ledger
COPY projections ./projections
COPY api ./api
COPY workers ./workers
COPY infra ./infra
RUN /opt/venv/bin/pip install --no-deps . && /opt/venv/bin/pip check

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --create-home --home-dir /app ledger
COPY --from=build /opt/venv /opt/venv
COPY data /app/data
COPY docker/entrypoint.sh /usr/local/bin/ledger-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMPORT_DIR=/app/data \
    API_HOST=0.0.0.0 \
    API_PORT=8000
USER ledger
WORKDIR /app
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)" || exit 1
ENTRYPOINT ["ledger-entrypoint"]
CMD ["api"]
