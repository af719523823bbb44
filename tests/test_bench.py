"""The benchmark's ``admin`` and ``execution`` scenarios at tiny sizes: their tables and
JSON files have the expected figures, and the figures are sane."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from intentqueue.anvil import anvil_available
from intentqueue.bench import Bench, Result, write_result
from intentqueue.models import Intent

ADMIN_PAGES = [
    "Queues page", "Queues live JSON", "dead-letter groups", "dead-letter one group (filter)",
    "dead-letter one group, last page", "dead-letter all jobs, last page", "failed job",
    "intents", "intents status FAILED", "intents search hash", "intents search correlation id",
]  # fmt: skip


def _written(result: Result, tmp_path: Path) -> dict[str, Any]:
    """What ``write_result`` wrote, read back."""
    path = write_result(result, tmp_path)
    assert path.name == f"{result.scenario}.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.django_db
def test_admin_scenario(redis_url: str, tmp_path: Path) -> None:
    result = Bench(redis_url=redis_url, out=io.StringIO()).admin(
        count=2000, failed_jobs=200, runs=2
    )
    table = result.table()
    data = _written(result, tmp_path)
    assert table.startswith("== admin")
    assert data["intents"] == 2000 and data["failed jobs"] == 200
    assert Intent.objects.count() == 2000
    for page in ADMIN_PAGES:
        assert f"{page} ms" in table
        assert 0 < data[f"{page} ms"] < 10_000, (page, data[f"{page} ms"])
    assert data["search hash found"] is True
    assert 0 < data["Redis bytes per failed job"] < 20_000
    assert "goal < 300 ms" in table


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_execution_scenario(redis_url: str, tmp_path: Path) -> None:
    if not anvil_available():
        pytest.skip("anvil is not installed in node_modules/.bin (run `npm ci`)")
    bench = Bench(redis_url=redis_url, out=io.StringIO())
    try:
        result = bench.execution(count=5, workers=2, profile=tmp_path, timeout=120)
    finally:
        bench.stop_workers()
    table = result.table()
    data = _written(result, tmp_path)
    assert "recheck: intents/s (re-checked later)" in table and "goal >= 50/s" in table
    assert "blocking: intents/s (waited in the worker)" in table
    for name in ("recheck", "blocking"):
        figures = data[name]
        assert figures["fulfilled"] == 5 and not figures["timed_out"], figures
        assert figures["intents_per_s"] > 0
        assert figures["validated_p50_ms"] <= figures["validated_p99_ms"]
        assert not math.isnan(figures["claimed_p50_ms"])
        assert figures["runs_per_intent"] >= 1
        assert figures["rpc_per_intent"] > 0
        assert "eth_sendRawTransaction" in figures["rpc_methods_per_intent"]
        assert figures["worker_cpu_ms_per_intent"] > 0 or not Path("/proc/stat").exists()
        assert figures["nonce_gaps"] == 0 and figures["duplicates"] == 0
        assert figures["transactions"]["fulfill"] == 5
        profile = figures["profile"]
        rpc = profile["per_intent"]["RPC requests"]["calls_per_intent"]
        assert rpc > 0 if profile["runs"] else rpc == 0, profile
        assert "django" in profile["cpu_ms_per_intent_by_package"] or not profile["runs"]
    assert data["blocking"]["runs_per_intent"] == 1
    assert (tmp_path / "execution-recheck-worker.prof").exists()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_pipeline_scenario(redis_url: str, tmp_path: Path) -> None:
    bench = Bench(redis_url=redis_url, out=io.StringIO())
    try:
        result = bench.pipeline(count=20)
    finally:
        bench.stop_workers()
    table = result.table()
    data = _written(result, tmp_path)
    assert "goal >= 250/s" in table and "goal >= 0.8" in table
    assert data["intents"] == 20 and data["intents/s"] > 0
    assert data["baseline intents/s (bare RQ)"] > 0
    for stage in ("fulfillment", "execution", "bare RQ"):
        # A job costs RQ a handful of round trips at least; a counter that saw nothing (or
        # counted every command of a pipeline) would be far outside this range.
        assert 5 < data[f"Redis round trips per job: {stage}"] < 60, (stage, data)
    assert data["fulfillment p50 ms"] <= data["fulfillment p99 ms"]
