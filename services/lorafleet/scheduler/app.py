"""Wires the scheduler service from its settings."""

from __future__ import annotations

from lorafleet.api.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from lorafleet.core.app import ServiceApp
from lorafleet.core.database import Database
from lorafleet.core.server import ServiceBinding
from lorafleet.core.sql import SqlIdempotencyStore
from lorafleet.scheduler.config import SchedulerSettings
from lorafleet.scheduler.nodes import NodeRpc
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.servicer import SchedulerServicer
from lorafleet.scheduler.store import SchedulerStore

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]


async def build_app(settings: SchedulerSettings) -> ServiceApp:
    db = Database(settings.database_url)
    idempotency = SqlIdempotencyStore(db)
    await idempotency.create_tables()
    scheduler = Scheduler(SchedulerStore(db), NodeRpc(settings.registry_address), settings)
    await scheduler.start()
    servicer = SchedulerServicer(scheduler, idempotency)
    return ServiceApp(
        bindings=[
            ServiceBinding(
                SERVICE.full_name,
                lambda server: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
                    servicer, server
                ),
            )
        ],
        on_shutdown=[scheduler.close, db.dispose],
    )
