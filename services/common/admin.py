"""plaudit.v1.AdminService: an immediate registry check for model-serving processes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from plaudit.services.common.errors import NotFoundError
from plaudit.services.common.hotswap import ModelWatcher
from plaudit.services.common.security.client import INSECURE, ClientCredentials
from plaudit.services.common.security.guard import CallRoles
from plaudit.v1 import admin_pb2, admin_pb2_grpc

CALL_ROLES: CallRoles = {"/plaudit.v1.AdminService/ReloadModel": "admin"}
"""Only ``admin`` reloads; a model-serving process adds this to its own service's table."""


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Checks the promotion (and shadow) pointer of one named model, or of every one served."""

    def __init__(
        self,
        watchers: Mapping[str, ModelWatcher[Any]],
        shadow_watchers: Mapping[str, ModelWatcher[Any]] | None = None,
    ) -> None:
        self._watchers = watchers
        self._shadows = shadow_watchers or {}

    async def _check(self, name: str) -> admin_pb2.ReloadModelResponse:
        outcome = await self._watchers[name].check()
        shadow = self._shadows.get(name)
        shadow_version = shadow_error = ""
        if shadow is not None:
            checked = await shadow.check()
            shadow_version, shadow_error = checked.live_version or "", checked.error
        return admin_pb2.ReloadModelResponse(
            live_version=outcome.live_version or "",
            promoted_version=outcome.promoted_version or "",
            swapped=outcome.swapped,
            last_swap_error=outcome.error,
            model=name,
            shadow_version=shadow_version,
            shadow_error=shadow_error,
        )

    async def ReloadModel(
        self, request: admin_pb2.ReloadModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReloadModelResponse:
        if request.model:
            if request.model not in self._watchers:
                raise NotFoundError(
                    f"model {request.model!r} is not served here (served: "
                    f"{', '.join(self._watchers)})"
                )
            return await self._check(request.model)
        replies = [await self._check(name) for name in self._watchers]
        first = admin_pb2.ReloadModelResponse()
        first.CopyFrom(replies[0])
        if len(replies) > 1:
            first.models.extend(replies)
        return first


def notify_reload(
    address: str,
    timeout: float = 300.0,
    credentials: ClientCredentials = INSECURE,
    model: str = "",
) -> admin_pb2.ReloadModelResponse:
    """Ask a serving process at ``address`` to pick up the registry's promoted (and shadow)
    version of ``model`` (empty: of every model it serves) now; its API key needs ``admin``."""
    with credentials.channel(address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        return stub.ReloadModel(admin_pb2.ReloadModelRequest(model=model), timeout=timeout)
