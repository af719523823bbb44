"""URLs of the deployment: the admin (with django-rq's views) and intentqueue's."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("", include("intentqueue.urls")),
    path("admin/rq/", include("django_rq.urls")),
    path("admin/", admin.site.urls),
]
