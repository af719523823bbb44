"""The queue core against a real Redis and real `manage.py rqworker` processes."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from django.db import transaction
from django.test import Client
from rq.job import Job
from rq.serializers import JSONSerializer

from intentqueue.models import Intent, IntentTransition
from intentqueue.queues import job_id_for
from intentqueue.services import QueueService, submit_intent
from intentqueue.status import IntentStatus as S
from tests.conftest import ROOT, Workers, wait_for
from tests.factories import IntentFactory, make_payload

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SCRIPTED = "tests.strategies.ScriptedStrategy"


def scripted(**options: object) -> dict[str, object]:
    return {
        "standard": {
            "class": "intentqueue.strategies.standard.StandardStrategy",
            "options": {"supported_chains": [1, 10]},
        },
        "scripted": {"class": SCRIPTED, "options": options},
    }


def status_of(intent: Intent) -> str:
    intent.refresh_from_db()
    return intent.status


def test_orm_save_reaches_validated_through_plain_rqworker(workers: Workers) -> None:
    with transaction.atomic():
        valid = IntentFactory()
        invalid = IntentFactory(destination_chain_id=999)
    workers.run_burst()
    assert status_of(valid) == S.VALIDATED
    assert status_of(invalid) == S.INVALID
    assert "destination chain 999" in invalid.last_error
    steps = list(valid.timeline.values_list("from_status", "to_status", "queue", "attempt"))
    assert steps == [
        ("PENDING", "VALIDATING", "intent-fulfillment", 1),
        ("VALIDATING", "VALIDATED", "intent-fulfillment", 1),
    ]
    # The valid intent now waits in the execution queue.
    metrics = QueueService().get_queue_metrics("blockchain-execution")
    assert metrics["waiting"] == 1


def test_rolled_back_intent_gets_no_job(workers: Workers, redis_client: redis.Redis) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        intent = IntentFactory()
        raise RuntimeError("roll back")
    assert not Intent.objects.filter(pk=intent.pk).exists()
    assert QueueService().get_queue_metrics("intent-fulfillment")["waiting"] == 0


def test_long_running_worker_picks_up_new_intents(workers: Workers) -> None:
    workers.start()
    intent = submit_intent(make_payload())
    wait_for(lambda: status_of(intent) == S.VALIDATED, timeout=30)


def test_transient_errors_retry_with_exponential_backoff(workers: Workers) -> None:
    options = {"attempts": 3, "backoff": {"type": "exponential", "delay": 2000}}
    with workers.configure(
        strategies=scripted(fail="transient", fail_times=5),
        queues={"fulfillment": {"default_job_options": options}},
    ):
        intent = IntentFactory(strategy="scripted")
        workers.start()
        wait_for(lambda: status_of(intent) == S.FAILED, timeout=40)
    errors = list(intent.timeline.filter(error_type="transient").order_by("at"))
    assert [e.attempt for e in errors] == [1, 2, 3]
    assert errors[-1].to_status == S.FAILED
    gaps = [(b.at - a.at).total_seconds() for a, b in itertools.pairwise(errors)]
    # Retry n waits delay * 2**(n-1): 2 s then 4 s. RQ schedules in whole seconds and its
    # scheduler polls once a second, so each delay is met within about a second.
    assert 1.0 <= gaps[0] <= 3.2, gaps
    assert 3.0 <= gaps[1] <= 5.2, gaps
    assert "transient failure" in intent.last_error
    failed = list(QueueService().failed_job_ids("intent-fulfillment"))
    assert [job_id for _, job_id in failed] == [job_id_for("fulfillment", intent.hash)]


def test_fixed_backoff_and_success_after_retries(workers: Workers) -> None:
    options = {"attempts": 3, "backoff": {"type": "fixed", "delay": 2000}}
    with workers.configure(
        strategies=scripted(fail="transient", fail_times=2),
        queues={"fulfillment": {"default_job_options": options}},
    ):
        intent = IntentFactory(strategy="scripted")
        workers.start()
        wait_for(lambda: status_of(intent) == S.VALIDATED, timeout=30)
    errors = list(intent.timeline.filter(error_type="transient").order_by("at"))
    assert [e.attempt for e in errors] == [1, 2]
    gap = (errors[1].at - errors[0].at).total_seconds()
    assert 1.0 <= gap <= 3.2  # 2 s, met within a second (whole-second scheduling)
    assert intent.timeline.last().attempt == 3  # type: ignore[union-attr]


def test_permanent_error_skips_retries(workers: Workers) -> None:
    with workers.configure(strategies=scripted(fail="permanent", fail_times=9)):
        intent = IntentFactory(strategy="scripted")
        workers.run_burst()
    assert status_of(intent) == S.FAILED
    assert intent.last_error_type == "permanent"
    assert intent.timeline.filter(to_status="VALIDATING").count() == 1
    job = Job.fetch(
        job_id_for("fulfillment", intent.hash),
        connection=QueueService().connection,
        serializer=JSONSerializer,
    )
    assert job.meta["failure_reason"] == "permanent"
    assert job.get_status() == "failed"


def test_network_error_retries_at_once(workers: Workers) -> None:
    options = {"attempts": 3, "backoff": {"type": "exponential", "delay": 10000}}
    with workers.configure(
        strategies=scripted(fail="network", fail_times=2),
        queues={"fulfillment": {"default_job_options": options}},
    ):
        intent = IntentFactory(strategy="scripted")
        started = time.monotonic()
        workers.start()
        wait_for(lambda: status_of(intent) == S.VALIDATED, timeout=30)
    assert time.monotonic() - started < 8  # a 10 s backoff would have been waited otherwise
    assert intent.timeline.filter(error_type="network").count() == 2


def test_unknown_strategy_goes_to_dead_letter_queue(workers: Workers) -> None:
    intent = IntentFactory(strategy="nope")
    workers.run_burst()
    assert status_of(intent) == S.FAILED
    assert intent.last_error_type == "unknown_strategy"
    assert "nope" in intent.last_error


def test_pause_holds_jobs_and_resume_drains_in_priority_order(workers: Workers) -> None:
    service = QueueService()
    service.pause_queue("intent-fulfillment")
    workers.start()  # a worker already waiting when jobs arrive
    time.sleep(1.5)
    normal = [IntentFactory(priority=10) for _ in range(3)]
    high = [IntentFactory(priority=1) for _ in range(3)]
    middle = IntentFactory(priority=5)
    time.sleep(3)
    assert all(status_of(i) == S.PENDING for i in [*normal, *high, middle])
    assert service.get_queue_metrics("intent-fulfillment")["waiting"] == 7
    assert service.is_paused("intent-fulfillment")
    # Paused across worker restarts.
    workers.stop_all()
    workers.start()
    time.sleep(2)
    assert all(status_of(i) == S.PENDING for i in normal)
    service.resume_queue("intent-fulfillment")
    wait_for(lambda: all(status_of(i) == S.VALIDATED for i in [*normal, *high, middle]))
    order = list(
        IntentTransition.objects.filter(to_status=S.VALIDATING)
        .order_by("at", "id")
        .values_list("intent_id", flat=True)
    )
    assert order == [i.pk for i in [*high, middle, *normal]]


def test_sigkill_mid_job_completes_elsewhere_without_using_an_attempt(
    workers: Workers,
) -> None:
    fast = {"stalled_interval": 1000, "lock_duration": 1000, "max_stalled_count": 3}
    with workers.configure(strategies=scripted(sleep_ms=4000), worker=fast):
        intent = IntentFactory(strategy="scripted")
        victim = workers.start()
        wait_for(lambda: status_of(intent) == S.VALIDATING, timeout=20)
        os.kill(victim.pid, signal.SIGKILL)  # the worker only: its scheduler must notice
        victim.wait()
        workers.start()
        wait_for(lambda: status_of(intent) == S.VALIDATED, timeout=40)
    claims = list(intent.timeline.filter(to_status=S.VALIDATING).values_list("attempt", flat=True))
    assert claims == [1, 1, 1]  # first run, the stall re-run (attempt unchanged), success
    stall = intent.timeline.get(error_type="stalled")
    assert "worker died" in stall.error


def test_delayed_retry_runs_soon_after_the_scheduling_worker_dies(
    workers: Workers, redis_client: redis.Redis
) -> None:
    """The worker holding the scheduler lock dies with its scheduler (the whole process
    group): another worker's scheduler takes over within seconds, not RQ's minute."""
    from intentqueue.worker import IntentScheduler

    options = {"attempts": 3, "backoff": {"type": "fixed", "delay": 1000}}
    lock = "rq:scheduler-lock:intent-fulfillment"
    with workers.configure(
        strategies=scripted(fail="transient", fail_times=1),
        queues={"fulfillment": {"default_job_options": options}},
    ):
        holder = workers.start()
        wait_for(lambda: redis_client.exists(lock), timeout=20)
        assert 0 < redis_client.ttl(lock) <= IntentScheduler.LOCK_SECONDS
        workers.start()
        time.sleep(2)  # the second worker is up, without the lock
        workers.kill(holder)
        intent = IntentFactory(strategy="scripted")
        wait_for(lambda: intent.timeline.filter(error_type="transient").exists(), timeout=20)
        failed_at = time.monotonic()
        wait_for(lambda: status_of(intent) == S.VALIDATED, timeout=40)
    # The retry waited for the dead scheduler's lock (10 s) and a take-over check (every
    # 5 s); with RQ's own locks it would wait a minute.
    assert time.monotonic() - failed_at < 25


def test_job_fails_as_stalled_after_max_stalled_count(workers: Workers) -> None:
    fast = {"stalled_interval": 1000, "lock_duration": 1000, "max_stalled_count": 1}
    with workers.configure(strategies=scripted(sleep_ms=60000), worker=fast):
        intent = IntentFactory(strategy="scripted")
        claims = intent.timeline.filter(to_status=S.VALIDATING, error="")
        for kill in range(2):
            victim = workers.start()
            wait_for(lambda kill=kill: claims.count() > kill, timeout=30)
            workers.kill(victim)
        workers.start()
        wait_for(lambda: status_of(intent) == S.FAILED, timeout=30)
    assert intent.last_error_type == "stalled"
    job = Job.fetch(
        job_id_for("fulfillment", intent.hash),
        connection=QueueService().connection,
        serializer=JSONSerializer,
    )
    assert job.meta["failure_reason"] == "stalled"
    assert job.meta["stalled_count"] == 2


def test_five_workers_process_every_intent_exactly_once(workers: Workers) -> None:
    with transaction.atomic():
        intents = IntentFactory.create_batch(1000)
    for _ in range(5):
        workers.start()
    wait_for(
        lambda: Intent.objects.filter(status=S.VALIDATED).count() == 1000,
        timeout=120,
        interval=0.5,
    )
    runs = IntentTransition.objects.filter(to_status=S.VALIDATED)
    assert runs.count() == 1000
    assert runs.values("intent_id").distinct().count() == len(intents)
    assert not IntentTransition.objects.exclude(error="").exists()


def test_enqueue_is_deduplicated_per_intent_and_stage(workers: Workers) -> None:
    intent = IntentFactory()
    service = QueueService()
    again = service.add_intent_to_fulfillment_queue(intent)
    assert not again.created
    assert service.get_queue_metrics("intent-fulfillment")["waiting"] == 1
    workers.run_burst()
    assert status_of(intent) == S.VALIDATED
    # A finished run does not block a new one (after an operator sent it back).
    intent.transition(S.FAILED)
    intent.reset_for_retry(S.PENDING)
    assert service.add_intent_to_fulfillment_queue(intent).created


def test_dead_letter_retry_and_clear(workers: Workers) -> None:
    with workers.configure(strategies=scripted(fail="permanent", fail_times=1)):
        first, second = IntentFactory(strategy="scripted"), IntentFactory(strategy="scripted")
        workers.run_burst()
        assert status_of(first) == status_of(second) == S.FAILED
        service = QueueService()
        assert service.get_queue_metrics("intent-fulfillment")["failed"] == 2
        outcome = service.retry_failed_jobs("intent-fulfillment", reason="fixed the strategy")
        assert outcome.count == 2
        assert status_of(first) == S.PENDING and first.attempts == 0
        workers.run_burst()  # the scripted failure happened once; now they pass
    assert status_of(first) == status_of(second) == S.VALIDATED
    assert first.timeline.filter(from_status="FAILED", to_status="PENDING").count() == 1
    assert service.get_queue_metrics("intent-fulfillment")["failed"] == 0

    with workers.configure(strategies=scripted(fail="permanent", fail_times=9)):
        third = IntentFactory(strategy="scripted")
        workers.run_burst()
    assert service.clear_failed_jobs("intent-fulfillment", reason="spam").count == 1
    assert service.get_queue_metrics("intent-fulfillment")["failed"] == 0
    assert status_of(third) == S.FAILED


def test_retention_keeps_the_last_n(workers: Workers) -> None:
    options = {"remove_on_complete": 5}
    with workers.configure(queues={"fulfillment": {"default_job_options": options}}):
        with transaction.atomic():
            IntentFactory.create_batch(60)
        workers.run_burst()
    assert Intent.objects.filter(status=S.VALIDATED).count() == 60
    assert QueueService().get_queue_metrics("intent-fulfillment")["completed"] == 5


def test_reconciler_requeues_what_redis_lost(workers: Workers, redis_client: redis.Redis) -> None:
    from intentqueue.reconcile import GRACE, Reconciler

    intents = IntentFactory.create_batch(3)
    redis_client.flushdb()  # Redis restarted without persistence
    Intent.objects.update(updated_at=intents[0].created_at - GRACE * 2)
    report = Reconciler().run()
    assert (report.checked, report.enqueued) == (3, 3)
    assert Reconciler().run().enqueued == 0  # idempotent
    workers.run_burst()
    assert all(status_of(i) == S.VALIDATED for i in intents)


def test_reconcile_command(workers: Workers) -> None:
    result = subprocess.run(
        [sys.executable, "manage.py", "reconcile_intents"],
        cwd=ROOT, env=workers.env(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "checked 0 intents" in result.stdout


def test_rq_info_and_django_rq_show_our_queues(workers: Workers, admin_user: object) -> None:
    intent = IntentFactory(priority=1)
    job_id = job_id_for("fulfillment", intent.hash)
    info = subprocess.run(
        [sys.executable, "-m", "rq.cli", "info", "--url", workers.redis_url],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "intent-fulfillment-p1" in info.stdout, info.stdout + info.stderr
    client = Client()
    client.force_login(admin_user)  # type: ignore[arg-type]
    page = client.get("/admin/rq/")
    assert page.status_code == 200 and "intent-fulfillment-p1" in page.text
    from django_rq.settings import get_queues_map

    index = get_queues_map()["intent-fulfillment-p1"]
    jobs_page = client.get(f"/admin/rq/queues/{index}/")
    assert jobs_page.status_code == 200 and job_id in jobs_page.text


def test_queue_limiter_caps_job_starts_across_workers(workers: Workers) -> None:
    from collections import Counter
    from datetime import datetime

    limiter = {"fulfillment": {"limiter": {"max": 3, "duration": 1000}}}
    with workers.configure(queues=limiter):
        with transaction.atomic():
            intents = IntentFactory.create_batch(9)
        workers.start()
        workers.start()
        wait_for(lambda: all(status_of(i) == S.VALIDATED for i in intents), timeout=40)
    connection = QueueService().connection
    starts = []
    for intent in intents:
        raw = connection.hget(f"rq:job:{job_id_for('fulfillment', intent.hash)}", "started_at")
        starts.append(datetime.strptime(raw.decode(), "%Y-%m-%dT%H:%M:%S.%fZ").timestamp())
    per_window = Counter(int(start) for start in starts)  # the limiter's 1 s windows
    assert max(per_window.values()) <= 3, per_window
    assert len(per_window) >= 3  # 9 starts at 3 a window need at least 3 windows


def test_reconciler_requeues_a_job_its_worker_popped_and_died_with(
    workers: Workers, redis_client: redis.Redis
) -> None:
    from intentqueue.reconcile import GRACE, ORPHAN_AGE, Reconciler

    intent = IntentFactory()
    job_id = job_id_for("fulfillment", intent.hash)
    # A worker popped the job and was killed before marking it started.
    assert redis_client.lpop("rq:queue:intent-fulfillment") == job_id.encode()
    old = (intent.created_at - ORPHAN_AGE * 2).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    redis_client.hset(f"rq:job:{job_id}", "enqueued_at", old)
    Intent.objects.update(updated_at=intent.created_at - GRACE * 2)
    assert Reconciler().run().enqueued == 1
    assert redis_client.lrange("rq:queue:intent-fulfillment", 0, -1) == [job_id.encode()]
    workers.run_burst()
    assert status_of(intent) == S.VALIDATED
