"""Settings of the intentqueue deployment, read from the environment.

- DEBUG: 1/true for development (default off).
- SECRET_KEY: Django's secret; required when DEBUG is off.
- ALLOWED_HOSTS: comma-separated host names (default localhost,127.0.0.1,[::1]).
- DATABASE_URL: e.g. postgres://user:pass@host:5432/db (default SQLite in var/).
- REDIS_URL: redis://[:password@]host:port/db, rediss:// for TLS (default: embedded Valkey).
- INTENTQUEUE_VAR_DIR: where SQLite and the embedded Valkey keep their files (./var).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from intentqueue.conf import rq_queues
from intentqueue.embedded_redis import ensure_embedded_redis

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("INTENTQUEUE_VAR_DIR") or BASE_DIR / "var").resolve()


def env_bool(name: str, default: bool = False) -> bool:
    """A boolean from the environment: 1/true/yes/on or 0/false/no/off."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r}: expected 1/true/yes/on or 0/false/no/off")


def env_list(name: str, default: str) -> list[str]:
    """A comma-separated list from the environment."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG")
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it in the environment (any long random string), "
            "or set DEBUG=1 for development."
        )
    SECRET_KEY = "insecure-development-key-do-not-use-in-production"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_rq",
    "intentqueue",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- database ---------------------------------------------------------------------------
VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'intentqueue.sqlite3'}", conn_max_age=600
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes write (web, workers): wait for the lock instead of failing, and
    # take the write lock at BEGIN so two writers never deadlock on an upgrade.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 30, "transaction_mode": "IMMEDIATE"}
    )

# --- Redis and the queues ---------------------------------------------------------------
# REDIS_URL (redis:// or rediss:// for TLS, password in the URL), or Sentinel with
# REDIS_SENTINELS=host:port,host:port + REDIS_SENTINEL_MASTER (+ REDIS_PASSWORD, REDIS_DB);
# with neither, an embedded Valkey is started for this checkout (data under var/).
REDIS_URL = os.environ.get("REDIS_URL", "").strip()
REDIS_SENTINELS = env_list("REDIS_SENTINELS", "")
REDIS_SENTINEL_MASTER = os.environ.get("REDIS_SENTINEL_MASTER", "").strip()
REDIS_PASSWORD = os.environ.get("REDIS_PASSWORD") or None
REDIS_DB = int(os.environ.get("REDIS_DB", "0"))
if REDIS_SENTINELS:
    if not REDIS_SENTINEL_MASTER:
        raise ImproperlyConfigured("REDIS_SENTINELS is set: set REDIS_SENTINEL_MASTER too")
    redis_settings: dict[str, object] = {
        "sentinels": REDIS_SENTINELS, "master_name": REDIS_SENTINEL_MASTER,
        "password": REDIS_PASSWORD, "db": REDIS_DB,
    }  # fmt: skip
    rq_connection: dict[str, object] = {
        "SENTINELS": [(a.rpartition(":")[0], int(a.rpartition(":")[2])) for a in REDIS_SENTINELS],
        "MASTER_NAME": REDIS_SENTINEL_MASTER, "PASSWORD": REDIS_PASSWORD, "DB": REDIS_DB,
    }  # fmt: skip
else:
    if not REDIS_URL:
        REDIS_URL = ensure_embedded_redis(VAR_DIR / "valkey")
    if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
        raise ImproperlyConfigured(
            f"REDIS_URL={REDIS_URL!r}: expected redis://[:password@]host:port/db, rediss:// "
            "(TLS) or unix://"
        )
    redis_settings = {"url": REDIS_URL}
    rq_connection = {"URL": REDIS_URL}

INTENTQUEUE: dict[str, object] = {
    "redis": redis_settings,
    "metrics_token": os.environ.get("METRICS_TOKEN") or None,
}
# INTENTQUEUE_JSON: a JSON object laid over INTENTQUEUE (top-level keys replaced), for
# deployments configured only through the environment.
if os.environ.get("INTENTQUEUE_JSON"):
    try:
        INTENTQUEUE.update(json.loads(os.environ["INTENTQUEUE_JSON"]))
    except (ValueError, TypeError) as error:
        raise ImproperlyConfigured(f"INTENTQUEUE_JSON is not a JSON object: {error}") from error
RQ_QUEUES = rq_queues(INTENTQUEUE, rq_connection)
# Our worker (in-process jobs, priorities, pause, stalls) and job class (allow-list) are
# what `manage.py rqworker <queue>` uses with no flags.
RQ = {"WORKER_CLASS": "intentqueue.worker.IntentWorker", "JOB_CLASS": "intentqueue.jobs.IntentJob"}
# django-rq's admin registration would mount its views for every staff user, including
# one that unpickles job meta; they are mounted at admin/rq/ behind permissions instead.
RQ_SHOW_ADMIN_LINK = False

# --- the rest ---------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT") or VAR_DIR / "static")
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns about a missing one
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

# --- production hardening (DEBUG off) -----------------------------------------------------
if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
    # Probes and scrapers talk plain HTTP inside the cluster.
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SECURE_CONTENT_TYPE_NOSNIFF = True
    SECURE_REFERRER_POLICY = "same-origin"
    X_FRAME_OPTIONS = "DENY"
    if env_bool("TRUST_X_FORWARDED_PROTO"):  # behind a TLS-terminating proxy
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO").upper()
# LOG_FORMAT=json writes one JSON object a line, with intent_hash, correlation_id, job_id,
# queue and trace_id on every line written while a job runs.
LOG_FORMAT = os.environ.get("LOG_FORMAT", "plain").lower()
if LOG_FORMAT not in {"plain", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r}: expected plain or json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"job": {"()": "intentqueue.logcontext.JobLogFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s %(intent_hash)s "
            "%(correlation_id)s %(job_id)s %(queue)s %(trace_id)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["job"]}
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "intentqueue": {"level": LOG_LEVEL, "handlers": ["console"], "propagate": False},
        "rq": {"level": LOG_LEVEL, "handlers": ["console"], "propagate": False},
    },
}
