"""Feedback service, storage and domain layer: human preference feedback in, training data out.

* :mod:`~plaudit.services.feedback.domain`: the feedback kinds, their validation and derived
  judgements
* :mod:`~plaudit.services.feedback.core`: one path from gRPC, HTTP JSON or a file line to a
  stored event
* :mod:`~plaudit.services.feedback.quality`: consensus weights, agreement (kappa), outliers
* :mod:`~plaudit.services.feedback.export`: the read-only view (exports, stats) the trainer uses
* :mod:`~plaudit.services.feedback.store`: idempotent durable writes (SQLite or PostgreSQL)
* :mod:`~plaudit.services.feedback.tables`, :mod:`~plaudit.services.feedback.migrate`: schema
  and migrations
"""
