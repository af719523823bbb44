"""A small chaos run: intents on two anvil chains while worker processes are SIGKILLed
every 1.5 s and Redis is restarted empty once; every intent must end FULFILLED, none
lost, none fulfilled twice on chain."""

from __future__ import annotations

from pathlib import Path

import pytest

from intentqueue.chaos import ChaosRun, anvil_available
from intentqueue.models import Intent
from intentqueue.status import IntentStatus
from tests.conftest import database_url

COUNT = 30


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_workers_killed_and_redis_restarted_lose_nothing(tmp_path: Path) -> None:
    if not anvil_available():
        pytest.skip("anvil is not installed in node_modules/.bin (run `npm ci`)")
    # Workers die alone (SIGKILL of the worker process, which runs the job; its scheduler
    # child stops by itself and hands its lock over). One confirmation: waiting for more
    # goes through delayed re-checks, i.e. RQ's scheduler, which changes hands at every
    # kill of its holder and makes this run slower than the suite can afford.
    run = ChaosRun(
        intents=COUNT, kill_every=1.5, fulfillment_workers=2, execution_workers=3,
        timeout=90, restart_redis_at=1 / 3, db_url=database_url(), log_dir=tmp_path, seed=7,
        kill_group=False, confirmations=1,
    )  # fmt: skip
    report = run.run()
    summary = report.result().table()
    assert not report.timed_out, summary
    assert report.statuses == {IntentStatus.FULFILLED: COUNT}, summary
    assert report.lost == 0 and report.duplicates == {}, summary
    assert report.missing_events == 0, summary
    assert report.redis_restarts == 1 and report.kills >= 1, summary
    assert Intent.objects.count() == COUNT
