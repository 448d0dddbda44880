"""Typed Python clients of the lorafleet services, async and blocking.

    from lorafleet.client import SchedulerClient, builtin_spec
    with SchedulerClient("127.0.0.1:50052") as scheduler:
        experiment = scheduler.submit(builtin_spec("count", max_steps=20))

Each async client (`AsyncXClient`) has one method per RPC, sets a deadline on
every call and raises `lorafleet.core.errors.LorafleetError` subclasses carrying
the server's `reason`; the blocking twin (`XClient`) runs the same code on a
private event loop.
"""

from lorafleet.client.environment import AsyncEnvironmentClient, EnvironmentClient
from lorafleet.client.registry import AsyncRegistryClient, RegistryClient
from lorafleet.client.scheduler import AsyncSchedulerClient, SchedulerClient, builtin_spec

__all__ = [
    "AsyncEnvironmentClient",
    "AsyncRegistryClient",
    "AsyncSchedulerClient",
    "EnvironmentClient",
    "RegistryClient",
    "SchedulerClient",
    "builtin_spec",
]
