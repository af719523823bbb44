"""The runnable deployment of intentqueue: settings, URLs, WSGI/ASGI."""
