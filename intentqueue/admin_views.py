"""The operators' console inside the admin: queues, dead-letter queues, failed jobs.

``QueueConsoleMixin`` adds these pages to a ``ModelAdmin`` (the audit ledger's, whose
model carries the queue permissions) through ``get_urls()``; every view is wrapped in
``admin_site.admin_view`` (login, staff, CSRF, no caching) and checks its permission:

| page                                  | permission                       |
|---------------------------------------|----------------------------------|
| queues, live JSON, dead-letter pages  | ``intentqueue.view_queues``      |
| pause / resume                        | ``intentqueue.pause_queue``      |
| retry failed jobs                     | ``intentqueue.retry_jobs``       |
| clear (delete) failed jobs            | ``intentqueue.clear_jobs``       |

Every change is a POST that first renders a confirmation page saying what will happen
and to how many jobs, then calls ``QueueService`` (which writes the audit row) and
reports with ``message_user``. Nothing here triggers RQ's registry cleanup.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import update_wrapper
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
    JsonResponse,
)
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy, ngettext
from redis.exceptions import RedisError
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job
from rq.results import Result
from rq.serializers import JSONSerializer

from intentqueue.dlq import DeadLetterIndex, Failure, decode_job_data, failure_of, load_rows
from intentqueue.exceptions import IntentQueueError, UnknownQueueError
from intentqueue.models import Intent
from intentqueue.queues import Stage, stage, stages
from intentqueue.rq_dashboard import may_use as may_use_rq_dashboard
from intentqueue.services import QueueService

if TYPE_CHECKING:
    _Base = admin.ModelAdmin[Any]
else:
    _Base = object

PERM_VIEW = "intentqueue.view_queues"
PERM_PAUSE = "intentqueue.pause_queue"
PERM_RETRY = "intentqueue.retry_jobs"
PERM_CLEAR = "intentqueue.clear_jobs"

#: Most failed jobs one request retries or clears; the page says so and the operator
#: repeats for the rest (each job is a database write and a few Redis calls).
MAX_JOBS_PER_REQUEST = 500
#: Rows per page of the dead-letter pages.
PER_PAGE = 50
#: Seconds a dead-letter page may spend grouping new failed jobs before it renders.
SYNC_BUDGET = 0.3
#: The same for the progress endpoint polled while a large backlog is being grouped.
SYNC_BUDGET_POLL = 1.0
#: Seconds between two refreshes of the queues page.
REFRESH_SECONDS = 5
DASH = "—"


# --- formatting -------------------------------------------------------------------------------


def fmt_count(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, int | float) else DASH


def fmt_rate(value: Any) -> str:
    return f"{value:,.1f}/min" if isinstance(value, int | float) else DASH


def fmt_percent(value: Any) -> str:
    """A share as a percentage (``success_rate`` is a fraction of 1)."""
    if not isinstance(value, int | float):
        return DASH
    return f"{value * 100 if value <= 1 else value:.1f}%"


def fmt_ms(value: Any) -> str:
    if not isinstance(value, int | float):
        return DASH
    return f"{value:,.0f} ms" if value < 1000 else f"{value / 1000:,.1f} s"


def fmt_age(seconds: Any) -> str:
    """A duration for people: 42 s, 3 min 5 s, 2 h 10 min, 3 d 4 h."""
    if not isinstance(seconds, int | float):
        return DASH
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def fmt_ago(moment: Any) -> str:
    if not isinstance(moment, datetime):
        return DASH
    return _("%(age)s ago") % {"age": fmt_age((timezone.now() - moment).total_seconds())}


def fmt_time(moment: datetime | None) -> str:
    if moment is None:
        return DASH
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S")


# --- the per-minute chart -----------------------------------------------------------------------

#: (metric key, CSS class, colour) of each chart's stacked series.
THROUGHPUT = (("completed", "iq-completed", "#3a9a50"), ("failed", "iq-failed", "#c4352b"))
FAILURES = (("failed", "iq-failed", "#c4352b"), ("retried", "iq-retried", "#d99400"))
SERIES_LABELS = {
    "completed": gettext_lazy("completed"),
    "failed": gettext_lazy("failed"),
    "retried": gettext_lazy("retried"),
}


def minute_chart(
    per_minute: Sequence[dict[str, Any]] | None,
    *,
    label: str,
    series: Sequence[tuple[str, str, str]] = THROUGHPUT,
    height: int = 120,
    empty: str = "",
) -> SafeString:
    """An SVG bar chart of ``series`` per minute over the last hour (stacked), or an
    empty frame saying there is no data yet. Built on the server: no script, no outside
    file, and the same markup serves the page and its live refresh."""
    width, left, right, top, bottom = 460, 30, 6, 8, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    rows = list(per_minute or [])[-60:]
    peak = max((sum(_num(r.get(key)) for key, _c, _k in series) for r in rows), default=0)
    scale = _nice_ceiling(peak)
    parts: list[str] = [
        format_html(
            '<svg class="iq-chart" viewBox="0 0 {} {}" role="img" aria-label="{}" '
            'xmlns="http://www.w3.org/2000/svg"><title>{}</title>',
            width,
            height,
            label,
            label,
        )
    ]
    for fraction in (0, 0.5, 1):
        y = top + plot_h - plot_h * fraction
        parts.append(
            format_html(
                '<line class="iq-grid" x1="{}" x2="{}" y1="{}" y2="{}" stroke="#999" '
                'stroke-opacity="0.35" stroke-width="1"/>'
                '<text class="iq-axis" x="{}" y="{}" text-anchor="end" font-size="10" '
                'fill="currentColor">{}</text>',
                left,
                width - right,
                _f(y),
                _f(y),
                left - 4,
                _f(y + 3),
                _short_number(scale * fraction),
            )
        )
    if not rows or peak == 0:
        parts.append(
            format_html(
                '<text class="iq-empty" x="{}" y="{}" text-anchor="middle" font-size="12" '
                'fill="currentColor" fill-opacity="0.6">{}</text>',
                _f(left + plot_w / 2),
                _f(top + plot_h / 2),
                (empty or _("No jobs finished in the last hour")) if rows else _("No data yet"),
            )
        )
    else:
        slot = plot_w / 60
        bar_w = max(1.0, slot * 0.8)
        offset = 60 - len(rows)
        for index, row in enumerate(rows):
            x = left + (offset + index) * slot + (slot - bar_w) / 2
            base = float(top + plot_h)
            values = [(key, _num(row.get(key)), css, color) for key, css, color in series]
            tip = "{}: {}".format(
                _minute_label(row.get("minute")),
                ", ".join(f"{int(value)} {key}" for key, value, _css, _color in values),
            )
            for _key, value, css, color in values:
                if not value:
                    continue
                h = plot_h * value / scale
                base -= h
                parts.append(
                    format_html(
                        '<rect class="{}" x="{}" y="{}" width="{}" height="{}" fill="{}">'
                        "<title>{}</title></rect>",
                        css,
                        _f(x, 2),
                        _f(base, 2),
                        _f(bar_w, 2),
                        _f(h, 2),
                        color,
                        tip,
                    )
                )
    first = _minute_label(rows[0].get("minute")) if rows else _("60 min ago")
    parts.append(
        format_html(
            '<text class="iq-axis" x="{}" y="{}" font-size="10" fill="currentColor">{}</text>'
            '<text class="iq-axis" x="{}" y="{}" font-size="10" text-anchor="end" '
            'fill="currentColor">{}</text>',
            left,
            height - 6,
            first,
            width - right,
            height - 6,
            _("now"),
        )
    )
    legend_x = left + plot_w / 2 - 70
    for index, (key, css, color) in enumerate(series):
        x = legend_x + index * 80
        parts.append(
            format_html(
                '<rect class="{}" x="{}" y="{}" width="9" height="9" fill="{}"/>'
                '<text class="iq-axis" x="{}" y="{}" font-size="10" fill="currentColor">'
                "{}</text>",
                css,
                _f(x, 0),
                height - 14,
                color,
                _f(x + 13, 0),
                height - 6,
                SERIES_LABELS.get(key, key),
            )
        )
    parts.append("</svg>")
    return mark_safe("".join(parts))


def _f(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^n at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    magnitude = 1
    while True:
        for step in (1, 2, 5):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def _short_number(value: float) -> str:
    if value >= 1000:
        return f"{value / 1000:g}k"
    return f"{value:g}"


def _minute_label(value: Any) -> str:
    if isinstance(value, datetime):
        return timezone.localtime(value).strftime("%H:%M")
    if isinstance(value, int | float):
        moment = datetime.fromtimestamp(value * 60 if value < 10**8 else value, tz=UTC)
        return timezone.localtime(moment).strftime("%H:%M")
    return str(value or "")


# --- queue cards ---------------------------------------------------------------------------------

#: (metric key, label, formatter): the card's figures, in order.
CARD_FIGURES: list[tuple[str, str, Callable[[Any], str]]] = [
    ("waiting", "Waiting", fmt_count),
    ("active", "Active", fmt_count),
    ("delayed", "Delayed", fmt_count),
    ("completed", "Completed", fmt_count),
    ("failed", "Failed", fmt_count),
    ("stalled", "Stalled", fmt_count),
    ("workers", "Live workers", fmt_count),
    ("jobs_per_minute", "Jobs / minute", fmt_rate),
    ("success_rate", "Success rate", fmt_percent),
    ("avg_duration_ms", "Avg duration", fmt_ms),
    ("oldest_waiting_age_s", "Oldest waiting", fmt_age),
    ("last_processed_at", "Last processed", fmt_ago),
]


@dataclass
class QueueCard:
    """One queue as the queues page shows it."""

    name: str
    metrics: dict[str, Any]
    problems: list[str]

    @property
    def paused(self) -> bool:
        return bool(self.metrics.get("paused"))

    @property
    def failed(self) -> int:
        return int(self.metrics.get("failed") or 0)

    @property
    def figures(self) -> list[tuple[str, str, str]]:
        return [(key, _(label), fmt(self.metrics.get(key))) for key, label, fmt in CARD_FIGURES]

    @property
    def charts(self) -> list[tuple[str, str, SafeString]]:
        """(key, caption, SVG) of the throughput and failure charts."""
        per_minute = self.metrics.get("per_minute")
        throughput = _("Jobs finished per minute, last hour")
        failures = _("Failures per minute, last hour (final and retried)")
        return [
            ("throughput", throughput,
             minute_chart(per_minute, label=f"{self.name}: {throughput}", series=THROUGHPUT)),
            ("failures", failures,
             minute_chart(per_minute, label=f"{self.name}: {failures}", series=FAILURES,
                          height=90, empty=_("No failures in the last hour"))),
        ]  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "paused": self.paused,
            "failed": self.failed,
            "problems": self.problems,
            "figures": {key: value for key, _label, value in self.figures},
            "charts": {key: str(svg) for key, _caption, svg in self.charts},
        }


def queue_cards(service: QueueService) -> tuple[list[QueueCard], str]:
    """A card per queue, and an error text if Redis could not be read."""
    try:
        health = service.get_queue_health()
    except RedisError as failure:
        return [QueueCard(s.name, {}, []) for s in stages()], f"{type(failure).__name__}: {failure}"
    by_name = health.get("queues") or {}
    cards = []
    for target in stages():
        metrics = by_name.get(target.name)
        if metrics is None:
            try:
                metrics = service.get_queue_metrics(target.name)
            except RedisError:
                metrics = {}
        cards.append(QueueCard(target.name, metrics, list(metrics.get("problems") or [])))
    error = "" if health.get("redis_status", "connected") == "connected" else _("Redis is down")
    return cards, error


# --- forms ---------------------------------------------------------------------------------------


class ReasonForm(forms.Form):
    """The confirmation form: why (audited)."""

    reason = forms.CharField(
        label="Reason",
        max_length=2000,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text="Recorded in the operator audit ledger.",
    )

    def __init__(self, *args: Any, required: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["reason"].required = required
        if required:
            self.fields["reason"].help_text = "Required. Recorded in the operator audit ledger."


@dataclass
class Operation:
    """A confirmed change: what the confirmation page says, and how to do it."""

    title: str
    summary: list[str]
    touches: int
    permission: str
    reason_required: bool
    run: Callable[[str, str], str]
    """Called with (actor, reason); returns the message for ``message_user``."""
    danger: bool = False
    button: str = ""


class _Window:
    """A page of a list whose size is known without loading it (``Paginator`` wants an
    object with ``count()``; only the page numbers are used)."""

    def __init__(self, request: HttpRequest, total: int, per_page: int | None = None) -> None:
        per_page = per_page or PER_PAGE
        self.total = total
        sized = type("Sized", (), {"count": lambda _self: total})()
        self.paginator = Paginator(sized, per_page)
        try:
            number = int(request.GET.get("p", "1"))
        except ValueError:
            number = 1
        self.number = min(max(1, number), self.paginator.num_pages)
        self.offset = (self.number - 1) * per_page
        self.per_page = per_page
        self.total_shown = f"{total:,}"
        self.range = list(self.paginator.get_elided_page_range(self.number, on_each_side=2))

    @property
    def has_other_pages(self) -> bool:
        return self.paginator.num_pages > 1


# --- the views -------------------------------------------------------------------------------


class QueueConsoleMixin(_Base):
    """Adds the queues pages to a ``ModelAdmin`` (see the module docstring)."""

    console_template_dir = "admin/intentqueue/console"

    # --- plumbing -------------------------------------------------------------------------

    def get_console_urls(self) -> list[URLPattern]:
        def wrap(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
            def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
                try:
                    return view(request, *args, **kwargs)
                except RedisError as error:
                    return self._unavailable(request, error)

            def wrapper(*args: Any, **kwargs: Any) -> HttpResponse:
                return self.admin_site.admin_view(update_wrapper(guarded, view))(*args, **kwargs)

            wrapper.model_admin = self  # type: ignore[attr-defined]
            return update_wrapper(wrapper, view)

        return [
            path("queues/", wrap(self.queues_view), name="intentqueue_queues"),
            path("queues/live.json", wrap(self.queues_live_view), name="intentqueue_queues_live"),
            path(
                "queues/<str:queue>/pause/",
                wrap(self.pause_view),
                {"action": "pause"},
                name="intentqueue_queue_pause",
            ),
            path(
                "queues/<str:queue>/resume/",
                wrap(self.pause_view),
                {"action": "resume"},
                name="intentqueue_queue_resume",
            ),
            path(
                "queues/breakers/<str:chain_id>/open/",
                wrap(self.breaker_view),
                {"action": "open"},
                name="intentqueue_breaker_open",
            ),
            path(
                "queues/breakers/<str:chain_id>/close/",
                wrap(self.breaker_view),
                {"action": "close"},
                name="intentqueue_breaker_close",
            ),
            path("queues/<str:queue>/dead-letter/", wrap(self.dlq_view), name="intentqueue_dlq"),
            path(
                "queues/<str:queue>/dead-letter/sync.json",
                wrap(self.dlq_sync_view),
                name="intentqueue_dlq_sync",
            ),
            path(
                "queues/<str:queue>/dead-letter/jobs/",
                wrap(self.dlq_jobs_view),
                name="intentqueue_dlq_jobs",
            ),
            path(
                "queues/<str:queue>/dead-letter/groups/<str:fingerprint>/",
                wrap(self.dlq_jobs_view),
                name="intentqueue_dlq_group",
            ),
            path(
                "queues/<str:queue>/dead-letter/act/",
                wrap(self.dlq_action_view),
                name="intentqueue_dlq_act",
            ),
            path(
                "queues/<str:queue>/jobs/<str:job_id>/",
                wrap(self.job_view),
                name="intentqueue_job",
            ),
        ]

    def _require(self, request: HttpRequest, *permissions: str) -> None:
        if not request.user.has_perms((PERM_VIEW, *permissions)):
            raise PermissionDenied

    @staticmethod
    def _stage(queue: str) -> Stage:
        try:
            target = stage(queue)
        except UnknownQueueError as error:
            raise Http404(str(error)) from error
        if target.name != queue:
            raise Http404(f"{queue} is a priority band of {target.name}, not a queue")
        return target

    def _context(self, request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
        user = request.user
        return {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "can_pause": user.has_perms((PERM_VIEW, PERM_PAUSE)),
            "can_retry": user.has_perms((PERM_VIEW, PERM_RETRY)),
            "can_clear": user.has_perms((PERM_VIEW, PERM_CLEAR)),
            "rq_dashboard_url": rq_dashboard_url() if may_use_rq_dashboard(user) else "",
            **extra,
        }

    def _unavailable(self, request: HttpRequest, error: RedisError) -> HttpResponse:
        """Redis did not answer: say so (503) instead of failing with a server error."""
        if request.path.endswith(".json"):
            return JsonResponse({"redis_error": f"{type(error).__name__}: {error}"}, status=503)
        response = self._render(
            request,
            "unavailable.html",
            self._context(request, _("Redis is not reachable"), error=error),
        )
        response.status_code = 503
        return response

    def _render(self, request: HttpRequest, name: str, context: dict[str, Any]) -> HttpResponse:
        request.current_app = self.admin_site.name
        return TemplateResponse(request, f"{self.console_template_dir}/{name}", context)

    @staticmethod
    def _service() -> QueueService:
        return QueueService()

    # --- queues ---------------------------------------------------------------------------

    def queues_view(self, request: HttpRequest) -> HttpResponse:
        """A card per queue: counts, rates, chart, and the controls the user may use."""
        self._require(request)
        service = self._service()
        cards, error = queue_cards(service)
        try:
            breakers = [
                {"chain_id": chain_id, **state} for chain_id, state in service.breakers().items()
            ]
        except RedisError:
            breakers = []
        return self._render(
            request,
            "queues.html",
            self._context(
                request,
                _("Queues"),
                cards=cards,
                breakers=breakers,
                redis_error=error,
                refresh_seconds=REFRESH_SECONDS,
            ),
        )

    def queues_live_view(self, request: HttpRequest) -> JsonResponse:
        """The queues page's figures and charts, for its refresh without a reload."""
        self._require(request)
        cards, error = queue_cards(self._service())
        return JsonResponse(
            {
                "at": timezone.now().isoformat(),
                "redis_error": error,
                "queues": [card.as_json() for card in cards],
            }
        )

    def pause_view(self, request: HttpRequest, queue: str, action: str) -> HttpResponse:
        """Pause or resume a queue, after confirmation."""
        self._require(request, PERM_PAUSE)
        target = self._stage(queue)
        service = self._service()
        metrics = service.get_queue_metrics(target.name)
        waiting, active = int(metrics.get("waiting") or 0), int(metrics.get("active") or 0)
        delayed = int(metrics.get("delayed") or 0)
        if action == "pause":

            def pause(actor: str, reason: str) -> str:
                service.pause_queue(target.name, actor=actor, reason=reason)
                return _("Paused %(queue)s: its jobs stay queued until it is resumed.") % {
                    "queue": target.name
                }

            operation = Operation(
                title=_("Pause %(queue)s") % {"queue": target.name},
                summary=[
                    ngettext(
                        "Workers finish the %(active)s job running now and then start nothing "
                        "from this queue.",
                        "Workers finish the %(active)s jobs running now and then start nothing "
                        "from this queue.",
                        active,
                    )
                    % {"active": f"{active:,}"},
                    _(
                        "%(waiting)s waiting and %(delayed)s delayed jobs stay where they are "
                        "until the queue is resumed; the pause survives worker restarts."
                    )
                    % {"waiting": f"{waiting:,}", "delayed": f"{delayed:,}"},
                ],
                touches=waiting + delayed,
                permission=PERM_PAUSE,
                reason_required=False,
                run=pause,
                button=_("Pause the queue"),
            )
        else:

            def resume(actor: str, reason: str) -> str:
                service.resume_queue(target.name, actor=actor, reason=reason)
                return _("Resumed %(queue)s.") % {"queue": target.name}

            operation = Operation(
                title=_("Resume %(queue)s") % {"queue": target.name},
                summary=[
                    ngettext(
                        "Workers start the %(waiting)s waiting job again, highest priority first.",
                        "Workers start the %(waiting)s waiting jobs again, highest priority first.",
                        waiting,
                    )
                    % {"waiting": f"{waiting:,}"},
                ]
                + ([] if metrics.get("paused") else [_("The queue is not paused now.")]),
                touches=waiting,
                permission=PERM_PAUSE,
                reason_required=False,
                run=resume,
                button=_("Resume the queue"),
            )
        return self._confirm(request, target, operation, back=reverse("admin:intentqueue_queues"))

    def breaker_view(self, request: HttpRequest, chain_id: str, action: str) -> HttpResponse:
        """Open or close a chain's circuit breaker by hand, after confirmation."""
        self._require(request, PERM_PAUSE)
        if not chain_id.isdigit():
            raise Http404(f"not a chain id: {chain_id[:40]}")
        service = self._service()
        target = stage("execution")
        chain = {"chain": chain_id}
        opening = action == "open"
        change = service.open_breaker if opening else service.close_breaker

        def run(actor: str, reason: str) -> str:
            change(chain_id, actor=actor, reason=reason)
            if opening:
                return _("Opened the circuit of chain %(chain)s.") % chain
            return _("Closed the circuit of chain %(chain)s.") % chain

        if opening:
            title = _("Open the circuit of chain %(chain)s") % chain
            summary = _(
                "Execution jobs for chain %(chain)s are held (no attempt is used) "
                "until the circuit is closed by hand; other chains keep running."
            )
        else:
            title = _("Close the circuit of chain %(chain)s") % chain
            summary = _(
                "Execution jobs for chain %(chain)s run again and its failure count "
                "starts from zero."
            )
        operation = Operation(
            title=title,
            summary=[summary % chain],
            touches=0,
            permission=PERM_PAUSE,
            reason_required=False,
            run=run,
            danger=opening,
            button=_("Open the circuit") if opening else _("Close the circuit"),
        )
        return self._confirm(request, target, operation, back=reverse("admin:intentqueue_queues"))

    # --- dead-letter queue --------------------------------------------------------------------

    def _index(self, target: Stage, service: QueueService) -> DeadLetterIndex:
        return DeadLetterIndex(target.name, service.connection)

    def dlq_view(self, request: HttpRequest, queue: str) -> HttpResponse:
        """The dead-letter queue grouped by failure fingerprint, largest group first."""
        self._require(request)
        target = self._stage(queue)
        service = self._service()
        index = self._index(target, service)
        report = index.sync(budget=SYNC_BUDGET)
        window = _Window(request, index.group_count())
        groups = index.groups(window.offset, window.per_page)
        failed = int(service.get_queue_metrics(target.name).get("failed") or 0)
        return self._render(
            request,
            "dlq.html",
            self._context(
                request,
                _("Dead-letter queue of %(queue)s") % {"queue": target.name},
                queue=target.name,
                groups=groups,
                window=window,
                report=report,
                failed=failed,
                failed_shown=f"{failed:,}",
            ),
        )

    def dlq_sync_view(self, request: HttpRequest, queue: str) -> JsonResponse:
        """Group more of a large backlog; polled by the dead-letter page until done."""
        self._require(request)
        target = self._stage(queue)
        report = self._index(target, self._service()).sync(budget=SYNC_BUDGET_POLL)
        return JsonResponse(
            {"indexed": report.indexed, "pending": report.pending, "busy": report.busy}
        )

    def dlq_jobs_view(
        self, request: HttpRequest, queue: str, fingerprint: str | None = None
    ) -> HttpResponse:
        """The failed jobs of one group (or all of them), newest first, a page at a time."""
        self._require(request)
        target = self._stage(queue)
        service = self._service()
        index = self._index(target, service)
        report = index.sync(budget=SYNC_BUDGET)
        group = None
        if fingerprint is not None:
            group = index.group(fingerprint)
            if group is None:
                self.message_user(
                    request,
                    _("That group is empty now: its jobs were retried or cleared."),
                    messages.INFO,
                )
                return HttpResponseRedirect(reverse("admin:intentqueue_dlq", args=[target.name]))
        window = _Window(request, index.count(fingerprint))
        rows = load_rows(
            service.connection, index.job_ids(fingerprint, window.offset, window.per_page)
        )
        urls = _intent_urls(rows)
        for row in rows:
            row.intent_url = urls.get(row.intent_id or 0, "")
        title = (
            _("Failed jobs: %(exc)s") % {"exc": group.exc_class}
            if group
            else _("All failed jobs of %(queue)s") % {"queue": target.name}
        )
        return self._render(
            request,
            "dlq_jobs.html",
            self._context(
                request,
                title,
                queue=target.name,
                group=group,
                rows=rows,
                window=window,
                report=report,
            ),
        )

    def dlq_action_view(self, request: HttpRequest, queue: str) -> HttpResponse:
        """Retry or clear failed jobs: all, a group, a selection or one job."""
        if not any(request.user.has_perms((PERM_VIEW, p)) for p in (PERM_RETRY, PERM_CLEAR)):
            raise PermissionDenied
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])  # changes start from a console form
        target = self._stage(queue)
        op = request.POST.get("op", "")
        if op not in ("retry", "clear"):
            raise Http404("unknown operation")
        self._require(request, PERM_RETRY if op == "retry" else PERM_CLEAR)
        service = self._service()
        index = self._index(target, service)
        scope = request.POST.get("scope", "")
        job_ids, described, total, single = self._scope(request, target, service, index, scope)
        if job_ids is not None and not job_ids:
            self.message_user(request, _("No failed jobs were selected."), messages.WARNING)
            return HttpResponseRedirect(self._back(request, target))
        operation = self._dlq_operation(
            target=target,
            service=service,
            index=index,
            op=op,
            job_ids=job_ids,
            described=described,
            total=total,
            single=single,
        )
        hidden: dict[str, str | list[str]] = {"op": op, "scope": scope}
        if scope == "group":
            hidden["group"] = request.POST.get("group", "")
        elif scope in ("job", "selected"):
            hidden["job_ids"] = job_ids or []
        return self._confirm(
            request, target, operation, back=self._back(request, target), hidden=hidden
        )

    def _scope(
        self,
        request: HttpRequest,
        target: Stage,
        service: QueueService,
        index: DeadLetterIndex,
        scope: str,
    ) -> tuple[list[str] | None, str, int, bool]:
        """(job ids or None for "everything", what they are, how many in all, one job?)"""
        if scope == "all":
            total = int(service.get_queue_metrics(target.name).get("failed") or 0)
            if total <= MAX_JOBS_PER_REQUEST:
                return (
                    None,
                    _("failed jobs of %(queue)s (all of them)") % {"queue": target.name},
                    total,
                    False,
                )
            ids = _oldest_failed(service, target, MAX_JOBS_PER_REQUEST)
            return ids, _("failed jobs of %(queue)s") % {"queue": target.name}, total, False
        if scope == "group":
            group = index.group(request.POST.get("group", ""))
            if group is None:
                raise Http404("no such group (it may have been retried or cleared)")
            ids = [
                job_id
                for job_id, _at in index.job_ids(
                    group.fingerprint, 0, MAX_JOBS_PER_REQUEST, newest=False
                )
            ]
            described = _("failed jobs with “%(exc)s: %(message)s”") % {
                "exc": group.exc_class,
                "message": group.message,
            }
            return ids, described, group.count, False
        if scope in ("selected", "job"):
            ids = list(dict.fromkeys(request.POST.getlist("job_ids")))[:MAX_JOBS_PER_REQUEST]
            if scope == "job" and len(ids) != 1:
                raise Http404("one job id expected")
            if scope == "job":
                return ids, _("failed job %(job)s") % {"job": ids[0]}, 1, True
            return ids, _("selected failed jobs"), len(ids), False
        raise Http404("unknown scope")

    def _dlq_operation(
        self,
        *,
        target: Stage,
        service: QueueService,
        index: DeadLetterIndex,
        op: str,
        job_ids: list[str] | None,
        described: str,
        total: int,
        single: bool,
    ) -> Operation:
        touches = total if job_ids is None else len(job_ids)
        left = max(0, total - touches)
        queue = target.name
        stage_start = "PENDING" if target.key == "fulfillment" else "VALIDATED"
        summary = []
        if left:
            summary.append(
                _(
                    "This request handles the oldest %(touches)s of %(total)s %(what)s; "
                    "repeat it for the remaining %(left)s."
                )
                % {
                    "touches": f"{touches:,}",
                    "total": f"{total:,}",
                    "what": described,
                    "left": f"{left:,}",
                }
            )
        if op == "retry":
            summary.append(
                ngettext(
                    "Retry %(count)s %(what)s: its intent goes back to %(start)s with its "
                    "attempts reset and a fresh job is queued in %(queue)s.",
                    "Retry %(count)s %(what)s: each job's intent goes back to %(start)s with "
                    "its attempts reset and a fresh job is queued in %(queue)s.",
                    touches,
                )
                % {
                    "count": f"{touches:,}",
                    "what": described,
                    "start": stage_start,
                    "queue": queue,
                }
            )
            summary.append(
                _("Jobs whose intent is no longer FAILED (fulfilled meanwhile) are skipped.")
            )
        else:
            summary.append(
                ngettext(
                    "Delete %(count)s %(what)s from the dead-letter queue. Its intent stays "
                    "(or becomes) FAILED. This cannot be undone.",
                    "Delete %(count)s %(what)s from the dead-letter queue. Their intents stay "
                    "(or become) FAILED. This cannot be undone.",
                    touches,
                )
                % {"count": f"{touches:,}", "what": described}
            )

        def run(actor: str, reason: str) -> str:
            if single and job_ids:
                return self._run_single(
                    service=service,
                    index=index,
                    queue=queue,
                    op=op,
                    job_id=job_ids[0],
                    actor=actor,
                    reason=reason,
                )
            if op == "retry":
                outcome = service.retry_failed_jobs(
                    queue, reason=reason, actor=actor, job_ids=job_ids
                )
            else:
                outcome = service.clear_failed_jobs(
                    queue, reason=reason, actor=actor, job_ids=job_ids
                )
            index.forget(job_ids or [])
            verb = (
                ngettext(
                    "Retried %(count)d failed job of %(queue)s.",
                    "Retried %(count)d failed jobs of %(queue)s.",
                    outcome.count,
                )
                if op == "retry"
                else ngettext(
                    "Cleared %(count)d failed job from %(queue)s.",
                    "Cleared %(count)d failed jobs from %(queue)s.",
                    outcome.count,
                )
            )
            text = verb % {"count": outcome.count, "queue": queue}
            if outcome.skipped:
                text += " " + ngettext(
                    "%(skipped)d job was skipped: its intent is no longer failed.",
                    "%(skipped)d jobs were skipped: their intents are no longer failed.",
                    outcome.skipped,
                ) % {"skipped": outcome.skipped}
            if left:
                text += " " + ngettext(
                    "%(left)d more is left; repeat to continue.",
                    "%(left)d more are left; repeat to continue.",
                    left,
                ) % {"left": left}
            return text

        if op == "retry":
            title = _("Retry failed jobs") if not single else _("Retry a failed job")
        else:
            title = _("Clear failed jobs") if not single else _("Delete a failed job")
        return Operation(
            title=title,
            summary=summary,
            touches=touches,
            permission=PERM_RETRY if op == "retry" else PERM_CLEAR,
            reason_required=op == "clear" or not single,
            run=run,
            danger=op == "clear",
            button=_("Retry") if op == "retry" else _("Delete"),
        )

    @staticmethod
    def _run_single(
        *,
        service: QueueService,
        index: DeadLetterIndex,
        queue: str,
        op: str,
        job_id: str,
        actor: str,
        reason: str,
    ) -> str:
        if op == "retry":
            done = service.retry_failed_job(queue, job_id, actor=actor, reason=reason)
            text = (
                _("Retried job %(job)s.")
                if done
                else _("Job %(job)s was not retried: it is not in the dead-letter queue, or "
                       "its intent is no longer failed.")
            )  # fmt: skip
        else:
            done = service.delete_failed_job(queue, job_id, actor=actor, reason=reason)
            text = (
                _("Deleted job %(job)s from the dead-letter queue.")
                if done
                else _("Job %(job)s is not in the dead-letter queue.")
            )
        index.forget([job_id])
        return text % {"job": job_id}

    def _back(self, request: HttpRequest, target: Stage) -> str:
        candidate = request.POST.get("next") or request.GET.get("next") or ""
        if candidate and url_has_allowed_host_and_scheme(
            candidate, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        ):
            return candidate
        return reverse("admin:intentqueue_dlq", args=[target.name])

    # --- confirmation -------------------------------------------------------------------------

    def _confirm(
        self,
        request: HttpRequest,
        target: Stage,
        operation: Operation,
        *,
        back: str,
        hidden: dict[str, str | list[str]] | None = None,
    ) -> HttpResponse:
        """Render the confirmation page; on its POST, run the operation and report."""
        self._require(request, operation.permission)
        confirmed = request.method == "POST" and request.POST.get("post") == "yes"
        form = ReasonForm(request.POST if confirmed else None, required=operation.reason_required)
        if confirmed and form.is_valid():
            actor = request.user.get_username()
            try:
                text = operation.run(actor, form.cleaned_data["reason"].strip())
            except (IntentQueueError, RedisError, NoSuchJobError) as error:
                self.message_user(request, f"{operation.title}: {error}", messages.ERROR)
            else:
                self.message_user(request, text, messages.SUCCESS)
            return HttpResponseRedirect(back)
        hidden_fields = [
            (name, value)
            for name, values in (hidden or {}).items()
            for value in (values if isinstance(values, list) else [values])
        ]
        return self._render(
            request,
            "confirm.html",
            self._context(
                request,
                operation.title,
                operation=operation,
                form=form,
                queue=target.name,
                hidden_fields=hidden_fields,
                back=back,
            ),
        )

    # --- one job ----------------------------------------------------------------------------

    def job_view(self, request: HttpRequest, queue: str, job_id: str) -> HttpResponse:
        """One job: data, every attempt's error, the traceback, worker, timings, intent."""
        self._require(request)
        target = self._stage(queue)
        service = self._service()
        detail = job_detail(service, target, job_id)
        if detail is None:
            raise Http404(f"no job {job_id} in {target.name}")
        return self._render(
            request,
            "job.html",
            self._context(
                request,
                _("Failed job") if detail["in_dlq"] else _("Job"),
                subtitle=job_id,
                queue=target.name,
                **detail,
            ),
        )


class _ReturnValuesUnread:
    """Reads a job's results without decoding their return values: the page shows none, and
    a result stream written by hand may hold anything (a pickle, bytes that are not JSON)."""

    dumps = staticmethod(JSONSerializer.dumps)

    @staticmethod
    def loads(data: bytes | str, *args: Any, **kwargs: Any) -> None:
        return None


def job_detail(service: QueueService, target: Stage, job_id: str) -> dict[str, Any] | None:
    """Everything the job page shows, or None if the job is unknown to this queue."""
    connection = service.connection
    bands = target.rq_names
    with connection.pipeline(transaction=False) as pipe:
        for band in bands:
            pipe.zscore(f"rq:failed:{band}", job_id)
        scores = pipe.execute()
    failed_band = next((b for b, s in zip(bands, scores, strict=True) if s is not None), None)
    try:
        job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        if failed_band is None:
            return None
        return {"job": None, "job_id": job_id, "in_dlq": True, "band": failed_band}
    if job.origin not in bands:
        return None
    results = Result.all(job, serializer=_ReturnValuesUnread)
    failures = [r for r in results if r.type == Result.Type.FAILED]
    traceback = failures[0].exc_string if failures else ""
    meta = dict(job.meta or {})
    failure: Failure = failure_of(meta, traceback)
    index = DeadLetterIndex(target.name, connection)
    raw_data = connection.hget(job.key, "data")
    data = decode_job_data(raw_data if isinstance(raw_data, bytes) else None)
    function, loaded_args = _call_of(job)
    args = data[2] if isinstance(data, list) and len(data) > 2 else loaded_args
    first = args[0] if isinstance(args, list | tuple) and args else None
    intent = None
    if isinstance(first, dict) and isinstance(first.get("intentId"), int):
        intent = Intent.objects.filter(pk=first["intentId"]).only("pk", "hash", "status").first()
    started, ended, enqueued = job.started_at, job.ended_at, job.enqueued_at
    worker_alive = bool(job.worker_name) and bool(connection.exists(f"rq:worker:{job.worker_name}"))
    return {
        "job": job,
        "job_id": job_id,
        "status": str(getattr(job.get_status(refresh=False), "value", "") or ""),
        "in_dlq": failed_band is not None,
        "band": job.origin,
        "fingerprint": index.fingerprints_of([job_id]).get(job_id, "") if failed_band else "",
        "failure": failure,
        "errors": meta.pop("errors", []),
        "meta": json.dumps(meta, indent=2, sort_keys=True, default=str),
        "data_json": json.dumps(first if first is not None else args, indent=2, default=str),
        "function": function,
        "traceback": traceback,
        "results": [
            {
                "type": Result.Type(r.type).name.replace("_", " ").lower(),
                "at": r.created_at,
                "worker": r.worker_name,
                "duration": _duration(r.execution_started_at, r.execution_ended_at),
            }
            for r in results
        ],
        "intent": intent,
        "intent_missing": first is not None and intent is None,
        "worker": job.worker_name or "",
        "worker_alive": worker_alive,
        "timings": [
            (_("Created"), fmt_time(job.created_at)),
            (_("Enqueued"), fmt_time(enqueued)),
            (_("Started"), fmt_time(started)),
            (_("Ended"), fmt_time(ended)),
            (_("Waited"), _duration(enqueued, started)),
            (_("Ran for"), _duration(started, ended)),
        ],
        "attempts": f"{len((job.meta or {}).get('errors') or [])} of "
        f"{meta.get('max_attempts', '?')}",
        "timeout": job.timeout,
        "failure_ttl": job.failure_ttl,
    }


def _call_of(job: Job) -> tuple[str, Any]:
    """The job's function and arguments; ("", None) when its data is not a JSON job (a
    hash written by hand, or by pickle: its recorded failure says why)."""
    try:
        return job.func_name or "", job.args
    except DeserializationError:
        return "", None


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return DASH
    seconds = (end - start).total_seconds()
    return fmt_ms(seconds * 1000) if seconds < 60 else fmt_age(seconds)


def _oldest_failed(service: QueueService, target: Stage, limit: int) -> list[str]:
    """Up to ``limit`` failed job ids, highest priority band first, oldest first within."""
    with service.connection.pipeline(transaction=False) as pipe:
        for band in target.rq_names:
            pipe.zrange(f"rq:failed:{band}", 0, limit - 1)
        replies = pipe.execute()
    ids = [member.decode() for reply in replies for member in reply]
    return ids[:limit]


def _intent_urls(rows: Sequence[Any]) -> dict[int, str]:
    """Admin links of the intents of ``rows`` that still exist (one query)."""
    wanted = {row.intent_id: row.intent_hash for row in rows if row.intent_id}
    if not wanted:
        return {}
    found = Intent.objects.filter(pk__in=list(wanted)).values_list("pk", "hash")
    return {
        pk: reverse("admin:intentqueue_intent_change", args=[pk])
        for pk, intent_hash in found
        if wanted.get(pk) in ("", intent_hash)
    }


def rq_dashboard_url() -> str:
    """django-rq's own dashboard, wherever the deployment mounted it ("" if nowhere)."""
    for name in ("django_rq:home", "admin:django_rq_dashboard_changelist"):
        try:
            return reverse(name)
        except NoReverseMatch:
            continue
    return ""
