"""The INTENTQUEUE settings: the spec's defaults, strict keys, clear errors, system check."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from intentqueue import conf
from intentqueue.checks import check_settings
from intentqueue.conf import intentqueue_settings


def test_defaults_are_the_spec_defaults() -> None:
    loaded = conf.load({})
    assert (loaded.redis.host, loaded.redis.port, loaded.redis.max_retries_per_request) == (
        "localhost", 6379, 3,
    )  # fmt: skip
    fulfillment, execution = loaded.queue("fulfillment"), loaded.queue("execution")
    assert (fulfillment.name, fulfillment.concurrency) == ("intent-fulfillment", 10)
    assert (execution.name, execution.concurrency) == ("blockchain-execution", 5)
    f_opts, e_opts = fulfillment.default_job_options, execution.default_job_options
    assert (f_opts.attempts, f_opts.backoff.type, f_opts.backoff.delay) == (3, "exponential", 2000)
    assert (e_opts.attempts, e_opts.backoff.type, e_opts.backoff.delay) == (3, "exponential", 5000)
    assert (f_opts.remove_on_complete, f_opts.remove_on_fail) == (100, 500)
    assert (e_opts.remove_on_complete, e_opts.remove_on_fail) == (100, 1000)
    worker = loaded.worker
    assert (worker.max_stalled_count, worker.stalled_interval, worker.lock_duration) == (
        3, 30000, 30000,
    )  # fmt: skip


def test_override_merges_key_by_key() -> None:
    loaded = conf.load({"queues": {"execution": {"default_job_options": {"attempts": 5}}}})
    options = loaded.queue("execution").default_job_options
    assert options.attempts == 5 and options.backoff.delay == 5000


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"queus": {}}, "INTENTQUEUE.queus: unknown setting"),
        ({"queues": {"fulfillment": {"concurency": 3}}},
         "INTENTQUEUE.queues.fulfillment.concurency: unknown setting"),
        ({"queues": {"fulfillment": {"concurrency": "ten"}}},
         "INTENTQUEUE.queues.fulfillment.concurrency: expected int"),
        ({"queues": {"fulfillment": {"concurrency": 0}}}, "must be at least 1"),
        ({"queues": {"execution": {"default_job_options": {"backoff": {"type": "linear"}}}}},
         "must be one of 'exponential', 'fixed'"),
        ({"worker": {"stalled_interval": 10}}, "stalled_interval: must be at least 1000"),
        ({"queues": {"execution": {"name": "intent-fulfillment"}}}, "different names"),
        ({"default_strategy": "nope"}, "'nope' is not an enabled strategy"),
        ("not a dict", "INTENTQUEUE: expected a dict"),
    ],
)  # fmt: skip
def test_bad_settings_name_the_path(override: Any, message: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=message.replace("(", r"\(")):
        conf.load(override)


def test_remove_on_complete_takes_bool_or_int() -> None:
    opts = {"default_job_options": {"remove_on_complete": True, "remove_on_fail": False}}
    loaded = conf.load({"queues": {"fulfillment": opts}})
    assert loaded.queue("fulfillment").default_job_options.remove_on_complete is True


def test_settings_reload_on_override() -> None:
    assert intentqueue_settings.worker.max_stalled_count == 3
    with override_settings(
        INTENTQUEUE={**settings.INTENTQUEUE, "worker": {"max_stalled_count": 7}}
    ):
        assert intentqueue_settings.worker.max_stalled_count == 7
    assert intentqueue_settings.worker.max_stalled_count == 3


@pytest.mark.django_db
def test_system_check_reports_bad_settings() -> None:
    with override_settings(INTENTQUEUE={"queues": {"fulfillment": {"attempts": 3}}}):
        errors = check_settings()
        assert [e.id for e in errors] == ["intentqueue.E001"]
        with pytest.raises(SystemCheckError, match="unknown setting"):
            call_command("check")


def test_system_check_requires_json_serializer() -> None:
    queues = {name: {**spec, "SERIALIZER": "rq.serializers.DefaultSerializer"}
              for name, spec in settings.RQ_QUEUES.items()}  # fmt: skip
    with override_settings(RQ_QUEUES=queues):
        assert {e.id for e in check_settings()} == {"intentqueue.E003"}
    with override_settings(RQ_QUEUES={}):
        assert {e.id for e in check_settings()} == {"intentqueue.E002"}


def test_rq_queues_are_json() -> None:
    for name in intentqueue_settings.queue_names:
        assert settings.RQ_QUEUES[name]["SERIALIZER"] == "rq.serializers.JSONSerializer"


def test_queue_by_name_rejects_unknown() -> None:
    from intentqueue.exceptions import UnknownQueueError

    with pytest.raises(UnknownQueueError, match="unknown queue 'nope'; the queues are"):
        intentqueue_settings.queue_by_name("nope")
