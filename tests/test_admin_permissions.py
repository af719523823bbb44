"""Who may see and do what in the operators' console: login, permissions, CSRF.

Every page and every action of the console is listed once in ``pages`` / ``actions``;
each test walks the whole list. Besides, every URL of the admin that is not Django's own
(intents, the audit ledger, the console, django-rq's dashboard) is found by walking the
URL resolver and must have an entry in ``NEEDS``, the permissions it requires: a new view
without an entry, or without a check, fails here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import NoReverseMatch, URLPattern, URLResolver, get_resolver, resolve, reverse
from django_rq.settings import get_queues_map

from intentqueue.breakers import OPEN, breaker_states
from intentqueue.models import Intent, OperatorAction
from intentqueue.queues import PAUSED_KEY
from intentqueue.services import QueueService
from intentqueue.status import IntentStatus as S
from tests.factories import IntentFactory
from tests.test_admin_dlq import fill_dead_letter_queue

pytestmark = pytest.mark.django_db

Q = "intent-fulfillment"
VIEW, PAUSE, RETRY, CLEAR = "view_queues", "pause_queue", "retry_jobs", "clear_jobs"


def make_staff(django_user_model: Any, *codenames: str, username: str = "staff") -> Any:
    """A staff user (not a superuser) with exactly these intentqueue permissions."""
    user = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    perms = Permission.objects.filter(content_type__app_label="intentqueue", codename__in=codenames)
    assert perms.count() == len(codenames), codenames
    user.user_permissions.set(perms)
    return user


def client_for(user: Any, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


@pytest.fixture
def world(redis_client: redis.Redis) -> dict[str, Any]:
    """A failed intent whose job is in the dead-letter queue, and its group."""
    from intentqueue.dlq import DeadLetterIndex

    intent = IntentFactory()
    intent.start_validation(queue=Q, attempt=1)
    intent.mark_failed("boom", "permanent", queue=Q)
    (job_id,) = fill_dead_letter_queue(redis_client, 1, intents=[(intent.pk, intent.hash)])
    index = DeadLetterIndex(Q, redis_client)
    index.sync(budget=None)
    return {"intent": intent, "job_id": job_id, "group": index.groups()[0].fingerprint}


def pages(world: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Every console page: name -> (url, permission needed besides view_queues)."""
    return {
        "queues": (reverse("admin:intentqueue_queues"), None),
        "live": (reverse("admin:intentqueue_queues_live"), None),
        "dlq": (reverse("admin:intentqueue_dlq", args=[Q]), None),
        "dlq sync": (reverse("admin:intentqueue_dlq_sync", args=[Q]), None),
        "dlq jobs": (reverse("admin:intentqueue_dlq_jobs", args=[Q]), None),
        "dlq group": (reverse("admin:intentqueue_dlq_group", args=[Q, world["group"]]), None),
        "job": (reverse("admin:intentqueue_job", args=[Q, world["job_id"]]), None),
        "pause": (reverse("admin:intentqueue_queue_pause", args=[Q]), PAUSE),
        "resume": (reverse("admin:intentqueue_queue_resume", args=[Q]), PAUSE),
    }


def actions(world: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any], str]]:
    """Every confirmed change: name -> (url, POST data, permission it needs)."""
    act = reverse("admin:intentqueue_dlq_act", args=[Q])
    sure = {"post": "yes", "reason": "because"}
    job = world["job_id"]
    return {
        "pause": (reverse("admin:intentqueue_queue_pause", args=[Q]), sure, PAUSE),
        "resume": (reverse("admin:intentqueue_queue_resume", args=[Q]), sure, PAUSE),
        "retry all": (act, {"op": "retry", "scope": "all", **sure}, RETRY),
        "clear all": (act, {"op": "clear", "scope": "all", **sure}, CLEAR),
        "retry group": (
            act,
            {"op": "retry", "scope": "group", "group": world["group"], **sure},
            RETRY,
        ),
        "clear group": (
            act,
            {"op": "clear", "scope": "group", "group": world["group"], **sure},
            CLEAR,
        ),
        "retry selected": (
            act,
            {"op": "retry", "scope": "selected", "job_ids": [job], **sure},
            RETRY,
        ),
        "clear selected": (
            act,
            {"op": "clear", "scope": "selected", "job_ids": [job], **sure},
            CLEAR,
        ),
        "retry job": (act, {"op": "retry", "scope": "job", "job_ids": [job], **sure}, RETRY),
        "delete job": (act, {"op": "clear", "scope": "job", "job_ids": [job], **sure}, CLEAR),
    }


def nothing_changed(world: dict[str, Any], redis_client: redis.Redis, audited: int = 0) -> bool:
    intent = Intent.objects.get(pk=world["intent"].pk)
    return (
        OperatorAction.objects.count() == audited
        and not redis_client.sismember(PAUSED_KEY, Q)
        and intent.status == S.FAILED
        and redis_client.zscore(f"rq:failed:{Q}", world["job_id"]) is not None
    )


def test_anonymous_is_sent_to_the_login_page(world: dict[str, Any]) -> None:
    client = Client()
    for name, (url, _perm) in pages(world).items():
        response = client.get(url)
        assert response.status_code == 302, name
        assert response["Location"].startswith("/admin/login/"), name
    for name, (url, data, _perm) in actions(world).items():
        response = client.post(url, data)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], name


def test_staff_without_permissions_gets_403_everywhere(
    world: dict[str, Any], django_user_model: Any, redis_client: redis.Redis
) -> None:
    client = client_for(make_staff(django_user_model))
    for name, (url, _perm) in pages(world).items():
        assert client.get(url).status_code == 403, name
    for name, (url, data, _perm) in actions(world).items():
        assert client.post(url, data).status_code == 403, name
        assert client.post(url, {k: v for k, v in data.items() if k != "post"}).status_code == (
            403
        ), name
    assert nothing_changed(world, redis_client)
    # Nor does the admin offer the console.
    index = client.get(reverse("admin:index"))
    assert reverse("admin:intentqueue_queues") not in index.text


def test_view_permission_shows_pages_but_allows_no_change(
    world: dict[str, Any], django_user_model: Any, redis_client: redis.Redis
) -> None:
    client = client_for(make_staff(django_user_model, VIEW))
    for name, (url, perm) in pages(world).items():
        expected = 403 if perm else 200
        assert client.get(url).status_code == expected, name
    for name, (url, data, _perm) in actions(world).items():
        assert client.post(url, data).status_code == 403, name
    assert nothing_changed(world, redis_client)
    queues = client.get(reverse("admin:intentqueue_queues")).text
    for button in ("iq-button-pause", "iq-button-retry", "iq-button-clear"):
        assert button not in queues


@pytest.mark.parametrize("granted", [PAUSE, RETRY, CLEAR])
def test_each_change_needs_its_own_permission(
    granted: str, world: dict[str, Any], django_user_model: Any, redis_client: redis.Redis
) -> None:
    client = client_for(make_staff(django_user_model, VIEW, granted))
    for name, (url, data, perm) in actions(world).items():
        if perm != granted:
            assert client.post(url, data).status_code == 403, name
    assert nothing_changed(world, redis_client)
    allowed = [(n, a) for n, a in actions(world).items() if a[2] == granted]
    name, (url, data, _perm) = allowed[0]
    response = client.post(url, data)
    assert response.status_code == 302, name
    assert OperatorAction.objects.get().actor == "staff"


def test_changes_need_view_queues_too(world: dict[str, Any], django_user_model: Any) -> None:
    client = client_for(make_staff(django_user_model, PAUSE, RETRY, CLEAR))
    for name, (url, data, _perm) in actions(world).items():
        assert client.post(url, data).status_code == 403, name


def test_post_without_csrf_token_is_refused(
    world: dict[str, Any], admin_user: Any, redis_client: redis.Redis
) -> None:
    client = client_for(admin_user, csrf=True)
    for name, (url, data, _perm) in actions(world).items():
        assert client.post(url, data).status_code == 403, name
    intent = world["intent"]
    for op in ("retry", "reenqueue"):
        url = reverse(f"admin:intentqueue_intent_{op}", args=[intent.pk])
        assert client.post(url, {"post": "yes"}).status_code == 403
    changelist = reverse("admin:intentqueue_intent_changelist")
    response = client.post(
        changelist,
        {"action": "retry_selected", "_selected_action": [intent.pk], "post": "yes",
         "reason": "x"},
    )  # fmt: skip
    assert response.status_code == 403
    assert nothing_changed(world, redis_client)


def test_post_with_the_csrf_token_works(world: dict[str, Any], admin_user: Any) -> None:
    client = client_for(admin_user, csrf=True)
    client.get(reverse("admin:intentqueue_queues"))
    token = client.cookies["csrftoken"].value
    url = reverse("admin:intentqueue_queue_pause", args=[Q])
    response = client.post(url, {"post": "yes", "csrfmiddlewaretoken": token})
    assert response.status_code == 302
    assert QueueService().is_paused(Q)


def test_action_endpoint_takes_no_get(world: dict[str, Any], admin_user: Any) -> None:
    client = client_for(admin_user)
    response = client.get(reverse("admin:intentqueue_dlq_act", args=[Q]))
    assert response.status_code == 405


def test_intent_retry_needs_retry_intent(
    world: dict[str, Any], django_user_model: Any, redis_client: redis.Redis
) -> None:
    viewer = make_staff(django_user_model, "view_intent", "change_intent")
    client = client_for(viewer)
    intent = world["intent"]
    change = client.get(reverse("admin:intentqueue_intent_change", args=[intent.pk]))
    assert change.status_code == 200
    assert "iq-button-retry-intent" not in change.text
    for op in ("retry", "reenqueue"):
        url = reverse(f"admin:intentqueue_intent_{op}", args=[intent.pk])
        assert client.get(url).status_code == 403
        assert client.post(url, {"post": "yes", "reason": "x"}).status_code == 403
    changelist = reverse("admin:intentqueue_intent_changelist")
    assert "retry_selected" not in client.get(changelist).text
    client.post(
        changelist,
        {"action": "retry_selected", "_selected_action": [intent.pk], "post": "yes",
         "reason": "x"},
    )  # fmt: skip
    assert nothing_changed(world, redis_client)

    operator = make_staff(django_user_model, "view_intent", "retry_intent", username="op")
    client = client_for(operator)
    change = client.get(reverse("admin:intentqueue_intent_change", args=[intent.pk]))
    assert "iq-button-retry-intent" in change.text
    assert "retry_selected" in client.get(changelist).text


def test_audit_ledger_needs_its_view_permission(django_user_model: Any) -> None:
    url = reverse("admin:intentqueue_operatoraction_changelist")
    assert client_for(make_staff(django_user_model, VIEW)).get(url).status_code == 403
    reader = make_staff(django_user_model, "view_operatoraction", username="reader")
    assert client_for(reader).get(url).status_code == 200


# --- every admin URL, found by the URL resolver ---------------------------------------------

#: Django's own admin pages (site index, login, users and groups) are not checked here.
DJANGO_ADMIN = {
    "index", "login", "logout", "password_change", "password_change_done", "jsi18n",
    "autocomplete", "view_on_site",
}  # fmt: skip
#: The admin's catch-all (a 404 for staff, the login page for the anonymous).
DJANGO_CATCH_ALL = "admin/(?P<url>.*)$"
INTENT_VIEW = frozenset({"view_intent", "change_intent"})  # Django's view permission: either
LEDGER_VIEW = frozenset({"view_operatoraction", "change_operatoraction"})
QUEUES = frozenset({VIEW})
#: Refused to everybody, superusers included.
NOBODY = "nobody"
#: What each URL needs: groups of permissions, at least one of each group. A user holding
#: every intentqueue permission but one group's is refused.
NEEDS: dict[str, tuple[frozenset[str], ...] | str] = {
    "admin:app_list": (),  # the app's index: any intentqueue permission at all
    "admin:intentqueue_intent_changelist": (INTENT_VIEW,),
    "admin:intentqueue_intent_change": (INTENT_VIEW,),
    "admin:intentqueue_intent_history": (INTENT_VIEW,),
    "admin/intentqueue/intent/<path:object_id>/": (INTENT_VIEW,),  # redirects to change
    "admin:intentqueue_intent_delete": (frozenset({"delete_intent"}),),
    "admin:intentqueue_intent_add": NOBODY,  # intents come in through submit_intent()
    "admin:intentqueue_intent_retry": (frozenset({"retry_intent"}),),
    "admin:intentqueue_intent_reenqueue": (frozenset({"retry_intent"}),),
    "admin:intentqueue_operatoraction_changelist": (LEDGER_VIEW,),
    "admin:intentqueue_operatoraction_change": (LEDGER_VIEW,),
    "admin:intentqueue_operatoraction_history": (LEDGER_VIEW,),
    "admin/intentqueue/operatoraction/<path:object_id>/": (LEDGER_VIEW,),
    "admin:intentqueue_operatoraction_add": NOBODY,  # the ledger is written by the service
    "admin:intentqueue_operatoraction_delete": NOBODY,
    **{f"admin:intentqueue_{name}": (QUEUES,) for name in (
        "queues", "queues_live", "dlq", "dlq_sync", "dlq_jobs", "dlq_group", "job")},
    **{f"admin:intentqueue_{name}": (QUEUES, frozenset({PAUSE})) for name in (
        "queue_pause", "queue_resume", "breaker_open", "breaker_close")},
    "admin:intentqueue_dlq_act": (QUEUES, frozenset({RETRY, CLEAR})),
    # django-rq's dashboard does what all four queue permissions allow, unaudited.
    **{f"django_rq:{name}": tuple(frozenset({p}) for p in (VIEW, PAUSE, RETRY, CLEAR))
       for name in (
        "home_json", "metrics", "home", "jobs", "queue_details", "finished_jobs",
        "failed_jobs", "delete_failed_jobs", "scheduled_jobs", "started_jobs",
        "deferred_jobs", "clear", "requeue_all", "job_detail", "result_detail",
        "delete_job", "requeue_job", "enqueue_job", "stop_job", "confirm_action",
        "actions", "workers", "worker_details", "scheduler_jobs", "cron_scheduler_detail",
        "cron_job_detail")},
}  # fmt: skip
#: Views with their own bearer token: the anonymous get 401, not the login page.
TOKEN_VIEWS = {"django_rq:home_json", "django_rq:metrics"}


def _walk(patterns: list[Any], route: str = "", namespace: str = "") -> Iterator[Any]:
    for entry in patterns:
        here = route + str(entry.pattern)
        if isinstance(entry, URLResolver):
            inner = f"{namespace}:{entry.namespace}" if namespace else entry.namespace or ""
            yield from _walk(entry.url_patterns, here, inner if entry.namespace else namespace)
        else:
            yield here, namespace, entry


def admin_routes() -> dict[str, list[tuple[str, URLPattern]]]:
    """Every URL of the admin that is not Django's own, and every django-rq view, by name
    (``namespace:name``; an unnamed one by its route): its routes and patterns."""
    found: dict[str, list[tuple[str, URLPattern]]] = {}
    for route, namespace, pattern in _walk(get_resolver().url_patterns):
        if namespace == "django_rq" or (
            namespace == "admin"
            and not route.startswith("admin/auth/")
            and pattern.name not in DJANGO_ADMIN
            and route != DJANGO_CATCH_ALL
        ):
            key = f"{namespace}:{pattern.name}" if pattern.name else route
            found.setdefault(key, []).append((route, pattern))
    return found


def url_of(key: str, route: str, pattern: URLPattern, values: dict[str, Any]) -> str:
    """The URL of a route, with the test's values for its parameters."""
    if not pattern.name:
        return "/" + route.replace("<path:object_id>", str(values["object_id"](route)))
    params = getattr(pattern.pattern, "converters", None) or pattern.pattern.regex.groupindex
    kwargs = {}
    for param in params:
        value = values[param]
        kwargs[param] = value(route) if callable(value) else value
    try:
        url = reverse(key, kwargs=kwargs)
    except NoReverseMatch:  # a regex with an optional group: fill the route in by hand
        filled = re.sub(r"\(\?P<(\w+)>[^)]*\)\??", lambda m: str(kwargs[m[1]]), route)
        url = "/" + filled.replace("^", "").replace("/?$", "/").removesuffix("$")
    assert resolve(url).view_name == key, (key, url)
    return url


@pytest.fixture
def routes(world: dict[str, Any]) -> Iterator[list[tuple[str, str]]]:
    """(name, URL) of every admin URL of ``NEEDS``, with real objects in it (one audit row
    among them)."""
    found = admin_routes()
    missing, stale = set(found) - set(NEEDS), set(NEEDS) - set(found)
    assert not missing, f"admin URLs without an entry in NEEDS: {sorted(missing)}"
    assert not stale, f"NEEDS entries no URL has any more: {sorted(stale)}"
    ledger_row = OperatorAction.objects.create(actor="someone", action="pause", queue=Q)
    values: dict[str, Any] = {
        "object_id": lambda route: ledger_row.pk if "operatoraction" in route
        else world["intent"].pk,
        "queue": Q, "fingerprint": world["group"], "job_id": world["job_id"],
        "chain_id": "31338", "queue_index": get_queues_map()[Q], "result_id": "1-0",
        "key": "some-worker", "scheduler_index": 0, "connection_index": 0,
        "scheduler_name": "some-scheduler", "cron_job_name": "some-job", "token": "notit",
        "app_label": "intentqueue",
    }  # fmt: skip
    yield [
        (key, url_of(key, route, pattern, values))
        for key, mounted in found.items()
        for route, pattern in mounted
    ]


def test_every_admin_url_sends_the_anonymous_to_the_login_page(
    routes: list[tuple[str, str]],
) -> None:
    client = Client()
    for key, url in routes:
        for method in (client.get, client.post):
            response = method(url)
            if key in TOKEN_VIEWS:
                assert response.status_code == 401, (key, url)
                continue
            assert response.status_code == 302, (key, url, response.status_code)
            assert response["Location"].startswith("/admin/login/"), (key, url)


def test_every_admin_url_refuses_staff_without_its_permissions(
    routes: list[tuple[str, str]],
    world: dict[str, Any],
    django_user_model: Any,
    admin_user: Any,
    redis_client: redis.Redis,
) -> None:
    everything = set(
        Permission.objects.filter(content_type__app_label="intentqueue").values_list(
            "codename", flat=True
        )
    )
    clients: dict[frozenset[str], Client] = {}

    def lacking(group: frozenset[str]) -> Client:
        held = frozenset(everything - group)
        if held not in clients:
            user = make_staff(django_user_model, *held, username=f"staff{len(clients)}")
            clients[held] = client_for(user)
        return clients[held]

    checked = 0
    for key, url in routes:
        needs = NEEDS[key]
        if needs == NOBODY:
            cases = [client_for(admin_user)]
        elif needs:
            cases = [lacking(group) for group in needs]
        else:  # any permission of the app opens it: refused with none
            cases = [lacking(frozenset(everything))]
        expected = 404 if key == "admin:app_list" else 403  # Django hides an app's index
        for client in cases:
            for method in (client.get, client.post):
                # An unnamed route redirects to the change page: follow it to the refusal.
                response = method(url, follow=key.startswith("admin/"))
                assert response.status_code == expected, (key, url, response.status_code)
                checked += 1
    assert checked >= 2 * len(routes)
    assert nothing_changed(world, redis_client, audited=1)
    assert all(b["state"] != OPEN for b in breaker_states(redis_client).values())


def test_django_rq_dashboard_needs_every_queue_permission(
    world: dict[str, Any], django_user_model: Any, admin_user: Any
) -> None:
    home = reverse("django_rq:home")
    queues = reverse("admin:intentqueue_queues")
    operator = client_for(make_staff(django_user_model, VIEW, PAUSE, RETRY, CLEAR))
    assert operator.get(home).status_code == 200
    assert f'href="{home}"' in operator.get(queues).text
    viewer = client_for(make_staff(django_user_model, VIEW, username="viewer"))
    assert viewer.get(home).status_code == 403
    assert f'href="{home}"' not in viewer.get(queues).text  # no link to a refusal
    assert client_for(admin_user).get(home).status_code == 200
