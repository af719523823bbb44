"""Retention: keep the last ``remove_on_complete`` / ``remove_on_fail`` jobs of a queue.

The trim runs in Redis as one script per registry kind: it counts the stage's registries
(a queue per priority), and when they hold more than the limit in all, removes the oldest
entries (lowest scores: RQ scores are expiry times) with their job hashes and results.
A worker queues it after every job in the round trip it already makes, so retention costs
one command per job whatever the number of priority queues.
"""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq.job import Job

from intentqueue.conf import JobOptions
from intentqueue.queues import Stage

#: Most entries one run of the script removes (the maintenance step loops until done), so
#: that lowering a limit by a lot never blocks Redis for long.
TRIM_BATCH = 1000

_TRIM_SCRIPT = """
local keep, batch, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local total = 0
for _, key in ipairs(KEYS) do total = total + redis.call('ZCARD', key) end
local excess = math.min(total - keep, batch)
if excess <= 0 then return 0 end
local oldest = {}
for _, key in ipairs(KEYS) do
  local rows = redis.call('ZRANGE', key, 0, excess - 1, 'WITHSCORES')
  for i = 1, #rows, 2 do oldest[#oldest + 1] = {tonumber(rows[i + 1]), key, rows[i]} end
end
table.sort(oldest, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[3] < b[3]
end)
for i = 1, excess do
  local entry = oldest[i]
  redis.call('ZREM', entry[2], entry[3])
  redis.call('DEL', prefix .. entry[3], 'rq:results:' .. entry[3])
end
return excess
"""


def registry_keys(stage: Stage) -> tuple[list[str], list[str]]:
    """The finished and failed registry keys of all of a stage's RQ queues."""
    return (
        [f"rq:finished:{name}" for name in stage.rq_names],
        [f"rq:failed:{name}" for name in stage.rq_names],
    )


def queue_trim(client: Any, stage: Stage) -> int:
    """Queue the stage's retention on ``client`` (a pipeline, or a connection to run it at
    once): one script per registry kind whose limit is set; returns how many were queued.
    Each returns the number of jobs it removed."""
    options: JobOptions = stage.options
    finished, failed = registry_keys(stage)
    queued = 0
    for keys, option in ((finished, options.remove_on_complete), (failed, options.remove_on_fail)):
        keep = JobOptions.keep_count(option)
        if keep is not None:
            prefix = Job.redis_job_namespace_prefix
            client.eval(_TRIM_SCRIPT, len(keys), *keys, keep, TRIM_BATCH, prefix)
            queued += 1
    return queued


def trim_registries(connection: Redis, stage: Stage) -> int:
    """Apply the stage's retention completely; returns how many jobs were removed."""
    removed = 0
    while True:
        with connection.pipeline(transaction=False) as pipe:
            if not queue_trim(pipe, stage):
                return removed
            batch = sum(int(n) for n in pipe.execute())
        removed += batch
        if batch < TRIM_BATCH:
            return removed
