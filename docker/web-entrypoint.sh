#!/bin/sh
# The web container's start: migrate, collect static files, then gunicorn in this
# process's place (exec), so it receives the container's stop signal.
set -eu
python manage.py migrate --noinput
python manage.py collectstatic --noinput --verbosity 0
exec gunicorn -c python:mlops_site.gunicorn_conf mlops_site.wsgi
