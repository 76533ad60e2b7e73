#!/bin/sh
# The container's commands are the `ledger` command line's, the same ones `make run` runs:
#   init    create the schema, import the bundled history (idempotent), catch up the read model
#   api     serve the HTTP API (uvicorn, API_WORKERS processes)
#   worker  a Celery worker (projections, imports, rebuilds)
#   beat    Celery beat (the periodic projection catch-up)
# Anything else is run as given (for example `ledger status`).
set -eu
case "${1:-api}" in
    init|api|worker|beat|setup|import|import-report|rebuild|status)
        exec ledger "$@" ;;
    *)
        exec "$@" ;;
esac
