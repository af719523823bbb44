"""Job processors: one per stage, loaded by the RQ entry points in ``intentqueue.jobs``."""
