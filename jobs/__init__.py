"""Celery app, thin idempotent tasks and the job ledger (issue 5)."""
