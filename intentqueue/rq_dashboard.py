"""django-rq's dashboard behind intentqueue's queue permissions, without its pickle paths.

django-rq's own views let any staff user empty queues and delete, requeue or stop jobs,
none of it audited; and two of them read jobs with RQ's default serializer, pickle:
"delete all failed jobs" (``Job.fetch_many`` without a serializer unpickles each job's
``meta``) and a cron job's history when its queue is not configured. A job hash in Redis
is not trusted input, so nothing here may unpickle it.

Mount these patterns instead of ``django_rq.urls`` (and keep ``RQ_SHOW_ADMIN_LINK =
False``: django-rq's admin registration mounts the same views for every staff user)::

    path("admin/rq/", include("intentqueue.rq_dashboard")),

Every view needs all of intentqueue's queue permissions, since between them django-rq's
pages do what each of those permissions allows; the two pickle paths answer 410 and
point to the dead-letter pages, which clear jobs without unpickling them (and audit it).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern
from django_rq.urls import get_admin_urlpatterns, get_api_urlpatterns

app_name = "django_rq"

#: What a user needs to open django-rq's pages.
PERMISSIONS = (
    "intentqueue.view_queues",
    "intentqueue.pause_queue",
    "intentqueue.retry_jobs",
    "intentqueue.clear_jobs",
)
#: django-rq views that would load job hashes with pickle.
UNPICKLING_VIEWS = frozenset({"delete_failed_jobs", "cron_job_detail"})


def may_use(user: Any) -> bool:
    """Whether ``user`` may open django-rq's dashboard."""
    return bool(user.is_active and user.is_staff and user.has_perms(PERMISSIONS))


def _guarded(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        # Anyone else is left to django-rq's own checks: a login page for the anonymous,
        # a bearer token (RQ_API_TOKEN) for its stats and metrics.
        if user.is_authenticated and not may_use(user):
            raise PermissionDenied
        return view(request, *args, **kwargs)

    return guarded


@staff_member_required
def _unavailable(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    return HttpResponse(
        "Not available: this django-rq page loads jobs with pickle. Clear failed jobs from "
        "intentqueue's dead-letter pages instead.\n",
        status=410,
        content_type="text/plain; charset=utf-8",
    )


def _patterns() -> list[URLPattern]:
    patterns = []
    for pattern in [*get_api_urlpatterns(), *get_admin_urlpatterns()]:
        view = _unavailable if pattern.name in UNPICKLING_VIEWS else pattern.callback
        patterns.append(
            URLPattern(pattern.pattern, _guarded(view), pattern.default_args, pattern.name)
        )
    return patterns


urlpatterns = _patterns()
