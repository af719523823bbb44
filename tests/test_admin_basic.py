"""The intent admin: a superuser sees intents and their timeline; content is read-only."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from intentqueue.status import IntentStatus as S
from tests.factories import IntentFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_logged_in(admin_user: object) -> Client:
    client = Client()
    client.force_login(admin_user)  # type: ignore[arg-type]
    return client


def test_list_and_detail_show_intent_and_timeline(admin_client_logged_in: Client) -> None:
    intent = IntentFactory()
    intent.start_validation(queue="intent-fulfillment", job_id="job-123", attempt=1)
    intent.mark_invalid("reward deadline passed", queue="intent-fulfillment", job_id="job-123")
    listing = admin_client_logged_in.get(reverse("admin:intentqueue_intent_changelist"))
    assert listing.status_code == 200
    assert intent.hash in listing.text
    detail = admin_client_logged_in.get(
        reverse("admin:intentqueue_intent_change", args=[intent.pk])
    )
    assert detail.status_code == 200
    assert "job-123" in detail.text and "reward deadline passed" in detail.text
    timeline = detail.text[detail.text.index('id="timeline-group"') :]
    assert timeline.index("Pending") < timeline.index("Invalid")


def test_search_by_hash(admin_client_logged_in: Client) -> None:
    wanted, other = IntentFactory(), IntentFactory()
    url = reverse("admin:intentqueue_intent_changelist")
    page = admin_client_logged_in.get(url, {"q": wanted.hash})
    assert wanted.hash in page.text and other.hash not in page.text


def test_no_add_and_status_not_editable(admin_client_logged_in: Client) -> None:
    intent = IntentFactory()
    assert admin_client_logged_in.get(reverse("admin:intentqueue_intent_add")).status_code == 403
    url = reverse("admin:intentqueue_intent_change", args=[intent.pk])
    admin_client_logged_in.post(url, {"status": S.FULFILLED, "strategy": "standard"})
    intent.refresh_from_db()
    assert intent.status == S.PENDING


def test_anonymous_redirected_to_login() -> None:
    response = Client().get(reverse("admin:intentqueue_intent_changelist"))
    assert response.status_code == 302 and "/login/" in response["Location"]
