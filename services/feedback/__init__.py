"""Feedback service, storage and domain layer: human preference feedback in, training data out.

* :mod:`~services.feedback.domain` - the feedback kinds, their validation and derived judgements
* :mod:`~services.feedback.quality` - consensus weights, agreement (kappa), outlier annotators
* :mod:`~services.feedback.store` - :class:`~services.feedback.store.FeedbackStore` (SQLite or
  PostgreSQL): idempotent durable writes and resumable exports
* :mod:`~services.feedback.tables`, :mod:`~services.feedback.migrate` - schema and migrations
"""
