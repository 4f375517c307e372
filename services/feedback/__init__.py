"""Feedback service, storage and domain layer: human preference feedback in, training data out.

* :mod:`~plaudit.services.feedback.domain` - the feedback kinds, their validation and derived
judgements
* :mod:`~plaudit.services.feedback.quality` - consensus weights, agreement (kappa), outlier
annotators
* :mod:`~plaudit.services.feedback.store` - :class:`~plaudit.services.feedback.store.FeedbackStore`
(SQLite or
  PostgreSQL): idempotent durable writes and resumable exports
* :mod:`~plaudit.services.feedback.tables`, :mod:`~plaudit.services.feedback.migrate` - schema and
migrations
"""
