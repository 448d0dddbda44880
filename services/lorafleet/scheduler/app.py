"""Wires the scheduler service from its settings."""

from __future__ import annotations

import structlog

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
from lorafleet.scheduler.store import idempotency as idempotency_answers

log = structlog.get_logger(__name__)

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]


async def build_app(settings: SchedulerSettings) -> ServiceApp:
    db = Database(settings.database_url)
    idempotency = SqlIdempotencyStore(db, idempotency_answers, ttl_s=settings.idempotency_ttl_s)
    scheduler = Scheduler(SchedulerStore(db), NodeRpc(settings.registry_address), settings)
    await scheduler.start()  # creates the tables, the answers' included
    swept = await idempotency.sweep()
    idempotency.start_sweeping()
    log.info("idempotency_swept_at_start", rows=swept)
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
        on_shutdown=[idempotency.close, scheduler.close, db.dispose],
    )
