"""intentqueue's own URLs (include them at the site root)."""

from django.urls import path

from intentqueue import views

app_name = "intentqueue"

urlpatterns = [
    path("healthz", views.liveness, name="liveness"),
    path("readyz", views.readiness, name="readiness"),
    path("metrics", views.metrics, name="metrics"),
]
