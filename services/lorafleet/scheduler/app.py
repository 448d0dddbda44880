"""Wires the scheduler service from its settings."""

from __future__ import annotations

import os
import signal

import structlog

from lorafleet.api.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from lorafleet.core.app import ServiceApp
from lorafleet.core.database import Database
from lorafleet.core.lease import LeaderLease
from lorafleet.core.server import ServiceBinding
from lorafleet.core.sql import SqlIdempotencyStore
from lorafleet.scheduler.config import SchedulerSettings
from lorafleet.scheduler.leadership import Leadership, gate_methods
from lorafleet.scheduler.nodes import NodeRpc
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.servicer import SchedulerServicer
from lorafleet.scheduler.store import SchedulerStore, leases
from lorafleet.scheduler.store import idempotency as idempotency_answers

log = structlog.get_logger(__name__)

SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"]

EXIT_LEASE_LOST = 3
"""The process's exit code after it lost the leader lease (restart it: it
rejoins as a standby)."""


async def build_app(settings: SchedulerSettings) -> ServiceApp:
    db = Database(settings.database_url)
    lease = LeaderLease(
        db,
        leases,
        "scheduler",
        holder=settings.replica_id,
        address=settings.advertised(),
        duration_s=settings.lease_duration_s,
        renew_deadline_s=settings.lease_renew_deadline_s,
        retry_period_s=settings.lease_retry_period_s,
    )
    idempotency = SqlIdempotencyStore(db, idempotency_answers, ttl_s=settings.idempotency_ttl_s)
    scheduler = Scheduler(
        SchedulerStore(db, fence=lease.fence), NodeRpc(settings.registry_address), settings
    )
    await scheduler.prepare()  # creates the tables, the answers' and the lease's included
    swept = await idempotency.sweep()
    idempotency.start_sweeping()
    log.info("idempotency_swept_at_start", rows=swept)
    app = ServiceApp(bindings=[])

    def exit_after_lease_lost(reason: str) -> None:
        # Graceful stop (drain, close), then exit non-zero so a supervisor
        # restarts it; the lease's fence already keeps its writes out.
        app.exit_code = EXIT_LEASE_LOST
        os.kill(os.getpid(), signal.SIGTERM)

    leadership = Leadership(
        lease, scheduler, SERVICE.full_name, exit_after_lease_lost, settings.advertised
    )
    await leadership.start()
    servicer = gate_methods(SchedulerServicer(scheduler, idempotency), SERVICE, leadership.require)
    app.bindings.append(
        ServiceBinding(
            SERVICE.full_name,
            lambda server: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(
                servicer, server
            ),
            serving_at_start=False,
        )
    )
    app.on_started = leadership.attach_health
    app.on_shutdown = [
        leadership.stop,
        idempotency.close,
        scheduler.close,
        leadership.release,
        db.dispose,
    ]
    return app
