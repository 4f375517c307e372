"""The calls a reward server serves and the role each needs (any other is refused to every key)."""

from plaudit.services.common import admin
from plaudit.services.common.security.guard import CallRoles

CALL_ROLES: CallRoles = {
    "/plaudit.v1.RewardService/Score": "score",
    "/plaudit.v1.RewardService/Compare": "score",
    "/plaudit.v1.RewardService/GetModel": "score",
    **admin.CALL_ROLES,
}
