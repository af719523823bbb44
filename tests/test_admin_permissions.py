"""Who may see and do what in the operators' console: login, permissions, CSRF.

Every page and every action of the console is listed once in ``PAGES`` / ``ACTIONS``;
each test walks the whole list, so a new view without a check fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

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


def nothing_changed(world: dict[str, Any], redis_client: redis.Redis) -> bool:
    intent = Intent.objects.get(pk=world["intent"].pk)
    return (
        not OperatorAction.objects.exists()
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
