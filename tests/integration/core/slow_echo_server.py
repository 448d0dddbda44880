"""A real service process for the shutdown test: ``serve()`` with one slow method.

Run as a script (PYTHONPATH=services). Settings come from the environment
(``LORAFLEET_SLOWECHO_*``) so the test can set the grace period.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import structlog
from google.protobuf import wrappers_pb2
from pydantic_settings import SettingsConfigDict

from lorafleet.core.config import ServiceSettings, load_settings
from lorafleet.core.logging import configure_logging
from lorafleet.core.server import ServiceBinding, run_service, serve

SERVICE = "lorafleet.testing.v1.SlowEchoService"
SLOW_CALL_S = 2.0
# Seconds a thread of the default executor keeps running after serve() returns,
# as a service's worker threads can while asyncio.run joins them.
LINGER_S = float(os.environ.get("SLOW_ECHO_LINGER_S", "0"))

log = structlog.get_logger("slow_echo_server")


class SlowEchoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_SLOWECHO_")


async def slow_echo(
    request: wrappers_pb2.StringValue, context: grpc.aio.ServicerContext
) -> wrappers_pb2.StringValue:
    log.info("slow_call_started", value=request.value)
    await asyncio.sleep(SLOW_CALL_S)
    log.info("slow_call_finished", value=request.value)
    return wrappers_pb2.StringValue(value=request.value)


def register(server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        slow_echo,
        request_deserializer=wrappers_pb2.StringValue.FromString,
        response_serializer=wrappers_pb2.StringValue.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"SlowEcho": handler}),)
    )


async def on_shutdown() -> None:
    log.info("resources_closed")
    if LINGER_S > 0:
        # Not awaited: asyncio.run waits for it after serve() has returned.
        asyncio.get_running_loop().run_in_executor(None, time.sleep, LINGER_S)


def main() -> None:
    settings = load_settings(SlowEchoSettings)
    configure_logging(settings.log_format, settings.log_level)
    run_service(serve([ServiceBinding(SERVICE, register)], settings, on_shutdown=on_shutdown))


if __name__ == "__main__":
    main()
