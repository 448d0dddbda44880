"""Which scheduler replica drives the experiments, and what the others answer.

Scheduler replicas share one database. Exactly one, the holder of the
"scheduler" lease (`lorafleet.core.lease`), runs the experiments and answers
SchedulerService calls; the others are standbys: their health reports the
service NOT_SERVING (so a balancer that follows health sends them nothing) and
any call that reaches one anyway fails UNAVAILABLE with reason NOT_LEADER,
naming the leader. When the leader stops cleanly it releases the lease and a
standby takes over within `lease_retry_period_s`; when it dies, within
`lease_duration_s`. Taking over is a scheduler restart: every experiment the
database says was running resumes at its last completed step.

A leader that loses the lease (it could not reach the database for
`lease_renew_deadline_s`, or was paused that long and another replica took
over) exits: its writes already fail in the database (the lease's fence), and a
fresh process rejoins as a standby.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import grpc.aio
import structlog
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from lorafleet.core.lease import LeaderLease, NotLeader
from lorafleet.scheduler.metrics import LEADER
from lorafleet.scheduler.service import Scheduler

log = structlog.get_logger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Leadership:
    """Runs `scheduler` while `lease` is held; keeps the service's health in step."""

    def __init__(
        self,
        lease: LeaderLease,
        scheduler: Scheduler,
        service_name: str,
        on_lost: Callable[[str], None],
        advertise: Callable[[int], str] | None = None,
    ) -> None:
        self.lease = lease
        self.scheduler = scheduler
        self.service_name = service_name
        self._on_lost = on_lost
        self._advertise = advertise
        self._elected = False
        self._health: health_aio.HealthServicer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def leading(self) -> bool:
        return self._elected and self.lease.leading

    async def start(self) -> None:
        """Lead at once if the lease is free (a lone replica serves with no wait),
        else stand by; either way keep the lease in the background."""
        if await self.lease.try_acquire_or_renew():
            await self._elected_now()
        else:
            holder = await self.lease.current()
            log.info(
                "scheduler_standby",
                replica=self.lease.holder,
                leader=holder.holder if holder else "",
                leader_address=holder.address if holder else "",
            )
        self._task = asyncio.create_task(
            self.lease.run(self._elected_now, self._lost),
            name=f"scheduler-lease-{self.lease.holder}",
        )

    async def attach_health(self, health: health_aio.HealthServicer, port: int) -> None:
        """Once serving: report health from now on, and advertise the address
        with the port the server bound (port 0 picks one; the next renewal
        writes it)."""
        if self._advertise is not None:
            self.lease.address = self._advertise(port)
        self._health = health
        await self._report()

    async def require(self) -> None:
        """Raise NOT_LEADER unless this replica leads (the RPC gate)."""
        if self.leading:
            return
        holder = await self.lease.current()
        if holder is None or holder.holder == self.lease.holder:
            where = "no replica leads yet; retry shortly"
        else:
            where = (
                f"the leader is {holder.holder!r} at {holder.address or 'an unknown address'}"
                f" (if it has died, this replica takes over within"
                f" {self.lease.duration_s:g} s)"
            )
        raise NotLeader(
            f"scheduler replica {self.lease.holder!r} is a standby; {where}",
            # For programs that redirect themselves (the message says it for people).
            metadata={
                "leader": holder.holder if holder else "",
                "leader_address": holder.address if holder else "",
            },
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def release(self) -> None:
        """After the scheduler has stopped: hand the lease over without a wait."""
        await self.lease.release()

    async def _elected_now(self) -> None:
        if self._elected:
            return
        log.info(
            "scheduler_leading", replica=self.lease.holder, fencing_token=self.lease.fencing_token
        )
        await self.scheduler.lead(fencing_token=self.lease.fencing_token)
        self._elected = True
        await self._report()

    async def _lost(self, reason: str) -> None:
        log.error("scheduler_lease_lost", replica=self.lease.holder, reason=reason)
        await self._report()
        self._on_lost(reason)

    async def _report(self) -> None:
        LEADER.set(1 if self.leading else 0)
        if self._health is not None:
            await self._health.set(self.service_name, SERVING if self.leading else NOT_SERVING)


def gate_methods(servicer: Any, service: ServiceDescriptor, require: Callable[[], Any]) -> Any:
    """Make every RPC of `service` on `servicer` await `require()` first."""
    for method in service.methods:
        setattr(servicer, method.name, _gated(getattr(servicer, method.name), require))
    return servicer


def _gated(handler: Callable[..., Any], require: Callable[[], Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await require()
            async for item in handler(request, context):
                yield item

        return stream

    @functools.wraps(handler)
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await require()
        return await handler(request, context)

    return unary
