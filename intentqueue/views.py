"""HTTP endpoints for probes and scrapers: liveness, readiness, Prometheus metrics.

Liveness and readiness are JSON, need no login and show no secrets (counts and problem
descriptions only). Metrics need the bearer token ``INTENTQUEUE.metrics_token`` or a
staff user with the ``intentqueue.view_queues`` permission.
"""

from __future__ import annotations

import hmac

from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from intentqueue.conf import intentqueue_settings
from intentqueue.health import check_health
from intentqueue.prometheus import exposition


@never_cache
@require_GET
def liveness(request: HttpRequest) -> JsonResponse:
    """The process answers."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readiness(request: HttpRequest) -> JsonResponse:
    """The database answers and the queues are healthy (rules in ``intentqueue.health``);
    503 with the problems otherwise."""
    health = check_health()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        database = "connected"
    except DatabaseError:
        database = "disconnected"
        health["problems"].append("database: not reachable")
    body = {
        "status": "ok" if health["is_healthy"] and database == "connected" else "unavailable",
        "redis_status": health["redis_status"],
        "database_status": database,
        "last_processed_at": health["last_processed_at"],
        "metrics": health["metrics"],
        "problems": health["problems"],
        "queues": {
            name: {k: m[k] for k in ("waiting", "active", "failed", "delayed", "paused",
                                      "workers", "oldest_waiting_age_s", "problems")}
            for name, m in health["queues"].items()
        },
    }  # fmt: skip
    return JsonResponse(body, status=200 if body["status"] == "ok" else 503)


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition."""
    if not _may_read_metrics(request):
        response = HttpResponse("authentication required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="intentqueue"'
        return response
    return HttpResponse(exposition(), content_type="text/plain; version=0.0.4; charset=utf-8")


def _may_read_metrics(request: HttpRequest) -> bool:
    token = intentqueue_settings.metrics_token
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        return hmac.compare_digest(header.removeprefix("Bearer ").strip(), token)
    user = request.user
    return bool(
        user.is_authenticated and user.is_staff and user.has_perm("intentqueue.view_queues")
    )
