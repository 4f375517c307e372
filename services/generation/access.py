"""The calls a generation server serves and the role each needs (any other is refused to every
key)."""

from plaudit.services.common import admin
from plaudit.services.common.security.guard import CallRoles

CALL_ROLES: CallRoles = {"/plaudit.v1.GenerationService/Generate": "generate", **admin.CALL_ROLES}
