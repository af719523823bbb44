# The intentqueue image: web (gunicorn) and workers (manage.py rqworker) run from it.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 INTENTQUEUE_VAR_DIR=/app/var
WORKDIR /app
COPY pyproject.toml README.md ./
COPY intentqueue ./intentqueue
COPY project ./project
COPY templates ./templates
COPY manage.py ./
RUN pip install --no-cache-dir . \
    && DEBUG=1 REDIS_URL=redis://unused:6379/0 python manage.py collectstatic --noinput \
    && useradd --create-home --uid 10001 app && mkdir -p /app/var && chown app /app/var
USER app
EXPOSE 8000
CMD ["gunicorn", "project.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "3"]
