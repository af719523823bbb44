"""Settings for the test suite: the deployment's settings with test-friendly defaults.

Tests use ``REDIS_URL`` when set, else a Redis on 127.0.0.1:6379 if one answers, else an
embedded Valkey; each test gets its own flushed database index (see tests/conftest.py).
"""

import os

from intentqueue.embedded_redis import redis_reachable

os.environ.setdefault("SECRET_KEY", "test-only-secret-key")
if not os.environ.get("REDIS_URL") and redis_reachable("redis://127.0.0.1:6379"):
    os.environ["REDIS_URL"] = "redis://127.0.0.1:6379/0"

from project.settings import *  # noqa: F403
from project.settings import REDIS_URL

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# The suite serves plain HTTP (test client, live server): no secure-only cookies there.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = False
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
TEST_REDIS_URL = REDIS_URL

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # A file, not memory: worker processes started by tests must see the same database.
    # One file per test run, so a run killed half-way (and its WAL files) never meets the next.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-{os.getpid()}.sqlite3")}  # noqa: F405

# Worker processes started by tests receive the test's INTENTQUEUE overrides as JSON.
if os.environ.get("INTENTQUEUE_TEST_SETTINGS"):
    import json

    from intentqueue.conf import rq_queues

    INTENTQUEUE = json.loads(os.environ["INTENTQUEUE_TEST_SETTINGS"])
    RQ_QUEUES = rq_queues(INTENTQUEUE, {"URL": os.environ["REDIS_URL"]})
