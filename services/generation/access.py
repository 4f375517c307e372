"""The calls a generation server serves, gRPC and HTTP, and the role each needs (any other is
refused to every key)."""

from plaudit.services.common import admin
from plaudit.services.common.security.guard import CallRoles

CALL_ROLES: CallRoles = {"/plaudit.v1.GenerationService/Generate": "generate", **admin.CALL_ROLES}
ROUTE_ROLES: CallRoles = {  # the OpenAI-style API (plaudit.services.generation.http)
    "POST /v1/chat/completions": "generate",
    "POST /v1/completions": "generate",
    "GET /v1/models": "generate",
    "GET /v1/models/{model}": "generate",
}
