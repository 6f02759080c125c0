"""Workers: the Celery app and its tasks, the Atlas HTTP client, rate limiting.

The Celery app lives in `workers.celery` so that `celery -A workers worker` finds it
while importing this package stays cheap for the CLI and the client.
"""
