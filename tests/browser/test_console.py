"""The operators' console in a real browser: log in, pause and resume a queue, watch the
queues page refresh itself, retry a dead-letter group and see the intent move on."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from intentqueue.models import Intent, OperatorAction
from intentqueue.queues import PAUSED_KEY
from intentqueue.services import QueueService
from intentqueue.status import IntentStatus as S
from tests.browser.conftest import log_in, shoot
from tests.conftest import Workers, wait_for
from tests.factories import IntentFactory
from tests.test_worker import scripted

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

QUEUE = "intent-fulfillment"


def card(page: Any, queue: str = QUEUE) -> Any:
    return page.locator(f'[data-queue="{queue}"]')


def test_log_in_pause_and_resume_a_queue(page: Any, operator: Any) -> None:
    log_in(page)
    shoot(page, "01-admin-index")
    page.click("a.section:has-text('Intent queue')")
    page.click("text=Queues and dead-letter queues")
    page.wait_for_url("**/queues/")
    assert page.locator(".breadcrumbs").inner_text().startswith("Home")
    assert card(page).locator("[data-when-running].iq-badge").is_visible()
    shoot(page, "02-queues")

    card(page).locator(".iq-button-pause").click()
    assert page.locator(".iq-confirm").is_visible()
    assert "Workers finish" in page.locator(".iq-summary").inner_text()
    shoot(page, "03-pause-confirmation")
    page.fill("#id_reason", "deploying a new RPC endpoint")
    page.click("input[type=submit]")
    page.wait_for_url("**/queues/")
    assert "Paused intent-fulfillment" in page.locator(".messagelist").inner_text()
    assert card(page).locator("[data-when-paused].iq-badge").is_visible()
    assert QueueService().is_paused(QUEUE)
    shoot(page, "04-queues-paused")

    card(page).locator(".iq-button-resume").click()
    page.click("input[type=submit]")
    page.wait_for_url("**/queues/")
    assert "Resumed intent-fulfillment" in page.locator(".messagelist").inner_text()
    assert card(page).locator("[data-when-running].iq-badge").is_visible()
    assert not QueueService().is_paused(QUEUE)
    actions = list(OperatorAction.objects.order_by("at").values_list("action", "actor", "reason"))
    assert actions == [
        ("pause", "operator", "deploying a new RPC endpoint"),
        ("resume", "operator", ""),
    ]
    page.goto(reverse("admin:intentqueue_operatoraction_changelist"))
    assert "deploying a new RPC endpoint" in page.content()
    shoot(page, "05-audit-ledger")


def test_queues_page_refreshes_itself(page: Any, operator: Any, redis_client: Any) -> None:
    log_in(page)
    page.goto(reverse("admin:intentqueue_queues"))
    page.evaluate("window.notReloaded = true")
    for _ in range(3):
        IntentFactory()  # each queues a fulfillment job (no worker runs here)
    redis_client.sadd(PAUSED_KEY, QUEUE)  # paused from elsewhere (a CLI, another operator)
    waiting = card(page).locator('[data-metric="waiting"]')
    try:
        page.wait_for_function(
            "el => el.textContent.trim() === '3'", arg=waiting.element_handle(), timeout=20_000
        )
    except Exception:
        status = page.locator("[data-live-status]").inner_text()
        keys = sorted(redis_client.keys("*"))
        raise AssertionError(
            f"waiting={waiting.inner_text()!r}, live status={status!r} keys={keys}"
            f" intents={list(Intent.objects.values_list('status', flat=True))}"
        ) from None
    assert card(page).locator("[data-when-paused].iq-badge").is_visible()
    assert card(page).locator(".iq-button-resume").is_visible()
    assert page.evaluate("window.notReloaded") is True
    assert "updated" in page.locator("[data-live-status]").inner_text()
    shoot(page, "06-queues-live-refreshed")


def test_retry_a_dead_letter_group_and_watch_the_intents(
    page: Any, operator: Any, workers: Workers
) -> None:
    with workers.configure(strategies=scripted(fail="permanent", fail_times=1)):
        intents = [IntentFactory(strategy="scripted") for _ in range(3)]
        workers.start()
        wait_for(lambda: all(_status(i) == S.FAILED for i in intents), timeout=40)

        log_in(page)
        page.goto(reverse("admin:intentqueue_queues"))
        assert card(page).locator('[data-metric="failed"]').inner_text() == "3"
        shoot(page, "07-queues-with-failures")
        card(page).locator('[data-metric="failed"] a').click()
        page.wait_for_url("**/dead-letter/")
        row = page.locator("tr[data-group]")
        assert row.count() == 1
        assert "PermanentError" in row.inner_text()
        assert "permanent failure on run <n>" in row.inner_text()
        assert row.locator("td.iq-num").inner_text() == "3"
        shoot(page, "08-dead-letter-groups")

        row.locator("a", has_text="PermanentError").click()
        page.wait_for_url("**/groups/**")
        assert page.locator('input[name="job_ids"]').count() == 3
        shoot(page, "09-dead-letter-group-jobs")
        page.locator("td.iq-mono a").first.click()
        page.wait_for_url("**/jobs/**")
        assert "Traceback" in page.locator(".iq-traceback").inner_text()
        assert "PermanentError" in page.locator(".iq-traceback").inner_text()
        shoot(page, "10-failed-job")
        page.go_back()

        page.locator(".iq-group-head .iq-button-retry").click()
        assert "This touches 3 jobs." in page.locator(".iq-touches").inner_text()
        page.click("input[type=submit]")  # no reason: the browser refuses to send it
        assert page.locator("#id_reason:invalid").count() == 1
        shoot(page, "11-retry-group-needs-a-reason")
        page.fill("#id_reason", "the validator bug is fixed")
        page.click("input[type=submit]")
        page.wait_for_url("**/dead-letter/**")
        assert "Retried 3 failed jobs" in page.locator(".messagelist").inner_text()

        target = intents[0]
        page.goto(reverse("admin:intentqueue_intent_change", args=[target.pk]))
        wait_for(lambda: _status(target) == S.VALIDATED, timeout=30)
        page.reload()
        timeline = page.locator("#timeline-group")
        steps = [
            "".join(cell.split()).upper()
            for cell in timeline.locator("td.iq-kind").all_inner_texts()
        ]
        assert steps == [
            "PENDING→VALIDATING", "VALIDATING→FAILED", "FAILED→PENDING", "PENDING→VALIDATING",
            "VALIDATING→VALIDATED",
        ]  # fmt: skip
        retry_row = timeline.locator("tbody tr").nth(2)
        assert "operator" in retry_row.inner_text()
        assert "permanent failure on run 1" in timeline.locator("tbody tr").nth(1).inner_text()
        shoot(page, "12-intent-timeline-after-retry")

        page.goto(reverse("admin:intentqueue_intent_changelist"))
        wait_for(lambda: all(_status(i) == S.VALIDATED for i in intents), timeout=30)
        page.reload()
        assert page.locator("#result_list .iq-status-validated").count() == 3
        shoot(page, "13-intents")
    assert OperatorAction.objects.filter(action="retry_failed", count=3).exists()


def test_retry_an_intent_from_its_page(page: Any, operator: Any, workers: Workers) -> None:
    with workers.configure(strategies=scripted(fail="permanent", fail_times=1)):
        intent = IntentFactory(strategy="scripted")
        workers.start()
        wait_for(lambda: _status(intent) == S.FAILED, timeout=40)
        log_in(page)
        page.goto(reverse("admin:intentqueue_intent_change", args=[intent.pk]))
        shoot(page, "14-failed-intent")
        page.click(".iq-button-retry-intent")
        assert "This touches 1 intent." in page.locator(".iq-touches").inner_text()
        shoot(page, "15-retry-intent-confirmation")
        page.click("input[type=submit]")
        assert "Retried 1 intent" in page.locator(".messagelist").inner_text()
        wait_for(lambda: _status(intent) == S.VALIDATED, timeout=30)


def _status(intent: Intent) -> str:
    intent.refresh_from_db(fields=["status"])
    return intent.status
