"""URLs of the deployment: the admin (with django-rq's views) and intentqueue's."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("intentqueue.urls")),
    # django-rq's views behind intentqueue's queue permissions (not django_rq.urls).
    path("admin/rq/", include("intentqueue.rq_dashboard")),
    path("admin/", admin.site.urls),
]
