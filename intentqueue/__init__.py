"""intentqueue: an intent solver's job queues on RQ and Redis, run from the Django admin."""
