#!/bin/sh
# Runs once, when the db volume is first initialised (postgres image's
# /docker-entrypoint-initdb.d): the MLflow tracking server's own database, owned
# by the platform's user. On an existing volume create it by hand:
#   docker compose exec db createdb -U "$POSTGRES_USER" "$MLFLOW_DB"
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${MLFLOW_DB:-mlflow}\" OWNER \"$POSTGRES_USER\""
