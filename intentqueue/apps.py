"""App configuration: connects signal receivers and registers system checks."""

from django.apps import AppConfig


class IntentQueueConfig(AppConfig):
    """The ``intentqueue`` Django app."""

    name = "intentqueue"
    verbose_name = "Intent queue"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from intentqueue import checks, signal_handlers  # noqa: F401
        from intentqueue.tracing import configure_tracing

        configure_tracing()
