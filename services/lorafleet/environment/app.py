"""Wires the built-in environment service from its settings."""

from __future__ import annotations

from lorafleet.api.environment.v1 import environment_pb2, environment_pb2_grpc
from lorafleet.core.app import ServiceApp
from lorafleet.core.server import ServiceBinding
from lorafleet.environment.config import EnvironmentSettings
from lorafleet.environment.servicer import BuiltinEnvironmentServicer

SERVICE = environment_pb2.DESCRIPTOR.services_by_name["EnvironmentService"]


async def build_app(settings: EnvironmentSettings) -> ServiceApp:
    servicer = BuiltinEnvironmentServicer(
        max_prompts_per_call=settings.max_prompts_per_call,
        max_items_per_call=settings.max_items_per_call,
    )
    return ServiceApp(
        bindings=[
            ServiceBinding(
                SERVICE.full_name,
                lambda server: environment_pb2_grpc.add_EnvironmentServiceServicer_to_server(
                    servicer, server
                ),
            )
        ]
    )
