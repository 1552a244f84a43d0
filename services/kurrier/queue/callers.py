"""Who may make which call on the queue's gRPC port: least privilege per client certificate.

Mutual TLS proves a client holds a certificate of the queue's CA; this
decides what that certificate may do, by its identity (`core/grpc_tls.py`).
Ingress, on every internet-facing pod, may only enqueue; only the admin
certificate may read or change queued mail. A method missing from the table
is refused to everyone, so a new RPC is closed until it is given an owner.
Without client certificates (plaintext, or TLS without a client CA) there is
no identity to check and the port's own reach is all that guards it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from kurrier.core.grpc_tls import ADMIN_IDENTITY, INGRESS_IDENTITY
from kurrier.v1 import queue_pb2

log = logging.getLogger(__name__)

_QUEUE = queue_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name
_HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

CALLERS: Mapping[str, frozenset[str]] = {
    f"/{_QUEUE}/Enqueue": frozenset({INGRESS_IDENTITY}),
    f"/{_QUEUE}/EnqueueMessages": frozenset({INGRESS_IDENTITY}),
    f"/{_QUEUE}/ListMessages": frozenset({ADMIN_IDENTITY}),
    f"/{_QUEUE}/GetMessage": frozenset({ADMIN_IDENTITY}),
    f"/{_QUEUE}/ApplyAction": frozenset({ADMIN_IDENTITY}),
    f"/{_QUEUE}/MessageHistory": frozenset({ADMIN_IDENTITY}),
    f"/{_QUEUE}/ListSites": frozenset({ADMIN_IDENTITY}),
    f"/{_HEALTH}/Check": frozenset({INGRESS_IDENTITY, ADMIN_IDENTITY}),
    f"/{_HEALTH}/Watch": frozenset({INGRESS_IDENTITY, ADMIN_IDENTITY}),
}

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
_HANDLERS: Mapping[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def identity(context: grpc.aio.ServicerContext) -> str:
    """The Common Name of the client's certificate; '' when it has none."""
    names = context.auth_context().get("x509_common_name", [])
    return names[0].decode(errors="replace") if names else ""


class CallerCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call with PERMISSION_DENIED unless CALLERS gives it to the client's identity.

    A refusal is logged once per identity and method (a client retrying in a
    loop must not flood the log); the log names the identity and the peer's
    address, never the certificate.
    """

    def __init__(self) -> None:
        self._logged: set[tuple[str, str]] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        # The peer's certificate is known to the call's context only, not here:
        # the check runs first in each of the handler's behaviours.
        kind = next(kind for kind in _HANDLERS if getattr(handler, kind) is not None)
        return _HANDLERS[kind](
            self._guarded(method, getattr(handler, kind)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _guarded(self, method: str, behavior: Behavior) -> Behavior:
        allowed = CALLERS.get(method, frozenset())
        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._admit(method, allowed, context)
                async for response in behavior(request, context):
                    yield response

            return streaming

        async def answering(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._admit(method, allowed, context)
            return await behavior(request, context)

        return answering

    async def _admit(
        self, method: str, allowed: frozenset[str], context: grpc.aio.ServicerContext
    ) -> None:
        caller = identity(context)
        if caller in allowed:
            return
        who = f"certificate {caller!r}" if caller else "a certificate without a Common Name"
        owners = " or ".join(sorted(allowed)) or "no client"
        if (caller, method) not in self._logged:
            self._logged.add((caller, method))
            log.warning("refused %s from %s at %s", method, who, context.peer())
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method} is for {owners}; this is {who}",
        )
