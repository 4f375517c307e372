"""The calls a reward server serves and the role each needs (any other is refused to every key)."""

from plaudit.services.common import admin
from plaudit.services.common.security.guard import CallRoles

CALL_ROLES: CallRoles = {
    "/plaudit.v1.RewardService/Score": "score",
    "/plaudit.v1.RewardService/Compare": "score",
    "/plaudit.v1.RewardService/GetModel": "score",
    **admin.CALL_ROLES,
}
ROUTE_ROLES: CallRoles = {  # the HTTP front end (plaudit.services.reward.http): METHOD /route
    "POST /v1/score": "score",
    "POST /v1/compare": "score",
    "GET /v1/model": "score",
    "POST /get_reward": "score",
    "POST /classify": "score",
    "POST /pooling": "score",
    "POST /predict": "score",
    "POST /rerank": "score",
}
PUBLIC_ROUTES = frozenset({"/healthz", "/openapi.json"})
"""Paths anyone may read (health for probes, the API description)."""
