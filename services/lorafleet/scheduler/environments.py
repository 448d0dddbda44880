"""Where an experiment's prompts and rewards come from.

Built-in tasks run in-process through the very servicer that serves them over
gRPC (same prompts, same scores, no network hop); remote environments are any
`EnvironmentService` reached by address, with a deadline on every call and a
few retries for transient failures. Either way the control loop sees one
`Environment` Protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from lorafleet.api.environment.v1 import environment_pb2 as env_pb
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.client.environment import AsyncEnvironmentClient
from lorafleet.core.errors import DeadlineExceeded, LorafleetError, Unavailable
from lorafleet.environment.servicer import BuiltinEnvironmentServicer
from lorafleet.environment.structs import struct_to_dict

DEFAULT_REMOTE_TIMEOUT_MS = 10_000
# Transient failures (deadline, unavailable) are retried this many times with
# backoff before the experiment is paused with the reason; the channel already
# retries UNAVAILABLE a few times underneath.
REMOTE_ATTEMPTS = 3


class EnvironmentFailed(LorafleetError):
    """The environment failed or timed out; pauses only its own experiment."""

    reason = "ENVIRONMENT_FAILED"


class Environment(Protocol):
    stop: list[str]

    async def sample_prompts(
        self, n: int, *, seed: int, step: int, eval: bool = False
    ) -> list[env_pb.EnvPrompt]: ...

    async def score(
        self, items: Sequence[tuple[env_pb.EnvPrompt, str]]
    ) -> list[env_pb.ScoreResult]: ...

    async def close(self) -> None: ...


class BuiltinEnvironment:
    def __init__(self, spec: pb.BuiltinEnvironment, experiment_id: str) -> None:
        self._servicer = BuiltinEnvironmentServicer(
            max_prompts_per_call=1 << 20, max_items_per_call=1 << 24
        )
        self._task = spec.task
        self._params = spec.params
        self._experiment_id = experiment_id
        self.stop = ["\n"]

    async def sample_prompts(
        self, n: int, *, seed: int, step: int, eval: bool = False
    ) -> list[env_pb.EnvPrompt]:
        request = env_pb.SamplePromptsRequest(
            experiment_id=self._experiment_id,
            task=self._task,
            task_params=self._params,
            num_prompts=n,
            seed=seed,
            step=step,
            eval=eval,
        )
        return list((await self._servicer.SamplePrompts(request, None)).prompts)

    async def score(
        self, items: Sequence[tuple[env_pb.EnvPrompt, str]]
    ) -> list[env_pb.ScoreResult]:
        request = env_pb.ScoreRequest(
            experiment_id=self._experiment_id,
            task=self._task,
            task_params=self._params,
            items=[env_pb.ScoreItem(prompt=p, completion=c) for p, c in items],
        )
        return list((await self._servicer.Score(request, None)).results)

    async def close(self) -> None:
        return None


class RemoteEnvironment:
    def __init__(self, spec: pb.RemoteEnvironment, experiment_id: str) -> None:
        self._client = AsyncEnvironmentClient(spec.address)
        self._task = spec.task
        self._params = struct_to_dict(spec.params)
        self._timeout_s = (spec.timeout_ms or DEFAULT_REMOTE_TIMEOUT_MS) / 1000
        self._experiment_id = experiment_id
        self._address = spec.address
        self.stop = ["\n"]

    async def describe(self) -> None:
        described = await self._call(self._client.describe)
        self.stop = list(described.stop) or self.stop

    async def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        last: LorafleetError | None = None
        for attempt in range(REMOTE_ATTEMPTS):
            try:
                return await fn(*args, **kwargs)
            except (DeadlineExceeded, Unavailable) as exc:
                last = exc
                await asyncio.sleep(0.2 * 2**attempt)
            except LorafleetError as exc:
                raise EnvironmentFailed(
                    f"environment {self._address} failed: {exc.message}",
                    reason="ENVIRONMENT_FAILED",
                    metadata={"cause": exc.reason},
                ) from exc
        assert last is not None
        raise EnvironmentFailed(
            f"environment {self._address} unreachable after {REMOTE_ATTEMPTS} attempts:"
            f" {last.message}",
            reason="ENVIRONMENT_UNAVAILABLE",
        ) from last

    async def sample_prompts(
        self, n: int, *, seed: int, step: int, eval: bool = False
    ) -> list[env_pb.EnvPrompt]:
        return await self._call(
            self._client.sample_prompts,
            self._task,
            n,
            params=self._params,
            seed=seed,
            step=step,
            eval=eval,
            experiment_id=self._experiment_id,
            timeout_s=self._timeout_s,
        )

    async def score(
        self, items: Sequence[tuple[env_pb.EnvPrompt, str]]
    ) -> list[env_pb.ScoreResult]:
        results = await self._call(
            self._client.score,
            self._task,
            list(items),
            params=self._params,
            experiment_id=self._experiment_id,
            timeout_s=self._timeout_s,
        )
        if len(results) != len(items):
            raise EnvironmentFailed(
                f"environment {self._address} returned {len(results)} scores for"
                f" {len(items)} items",
                reason="ENVIRONMENT_BAD_RESPONSE",
            )
        for result in results:
            if not 0.0 <= result.reward <= 1.0:
                raise EnvironmentFailed(
                    f"environment {self._address} returned reward {result.reward} outside [0, 1]",
                    reason="ENVIRONMENT_BAD_RESPONSE",
                )
        return results

    async def close(self) -> None:
        await self._client.close()


async def open_environment(spec: pb.EnvironmentSpec, experiment_id: str) -> Environment:
    if spec.WhichOneof("kind") == "builtin":
        return BuiltinEnvironment(spec.builtin, experiment_id)
    remote = RemoteEnvironment(spec.remote, experiment_id)
    await remote.describe()
    return remote
