"""Plumbing shared by every service and by the trainer: settings, logging, errors, metrics,
health, the model registry, text formatting and the dynamic batcher. Never imports torch."""
