"""Every service process serves Prometheus metrics when metrics_port is set: the
registry and the scheduler started as real processes (`python -m lorafleet.<service>`,
settings from the environment, as in a container), scraped over HTTP before and
after real RPCs."""

from __future__ import annotations

import urllib.error

import pytest
from metrics_scrape import read_metrics_port, sample, scrape

from lorafleet.api.scheduler.v1 import scheduler_pb2
from lorafleet.client import RegistryClient, SchedulerClient, builtin_spec
from lorafleet.cluster.local import LocalCluster, ServiceSpec
from lorafleet.core.errors import InvalidArgument, NotFound
from lorafleet.registry.testing import write_adapter

REGISTRY_SERVICE = "lorafleet.registry.v1.AdapterRegistryService"
SCHEDULER_SERVICE = "lorafleet.scheduler.v1.SchedulerService"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("metrics"))
    registry = cluster.start_and_wait(
        ServiceSpec("registry", "registry", {"LORAFLEET_REGISTRY_METRICS_PORT": "0"})
    )
    cluster.start_and_wait(
        ServiceSpec(
            "scheduler",
            "scheduler",
            {
                "LORAFLEET_SCHEDULER_METRICS_PORT": "0",
                "LORAFLEET_SCHEDULER_REGISTRY_ADDRESS": registry,
            },
        )
    )
    yield cluster
    cluster.stop_all(timeout_s=15)


def test_registry_counts_publishes_and_rpcs(cluster, tmp_path):
    port = read_metrics_port(cluster.services["registry"].log_path)
    before = scrape(port)
    assert sample(before, "lorafleet_registry_publishes_total", mode="upload", code="OK") == 0

    directory = write_adapter(tmp_path / "v1", rank=4, alpha=8.0)
    with RegistryClient(cluster.services["registry"].address) as client:
        client.create_adapter("metrics-a", lora={"rank": 4, "alpha": 8.0}, base_model="tiny")
        response = client.upload_version("metrics-a", directory, expected_parent_version=0)
        with pytest.raises(NotFound):
            client.get_adapter("no-such-adapter")
    size = response.version.size_bytes
    assert size > 0

    after = scrape(port)
    assert sample(after, "lorafleet_registry_publishes_total", mode="upload", code="OK") == 1
    assert sample(after, "lorafleet_registry_published_bytes_total", mode="upload") == size
    assert sample(after, "lorafleet_registry_publish_seconds_count", mode="upload") == 1
    rpc = {"grpc_service": REGISTRY_SERVICE}
    assert (
        sample(
            after,
            "grpc_server_handled_total",
            grpc_type="client_stream",
            grpc_method="UploadVersion",
            grpc_code="OK",
            **rpc,
        )
        == 1
    )
    assert (
        sample(
            after,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_method="GetAdapter",
            grpc_code="NOT_FOUND",
            **rpc,
        )
        == 1
    )


def test_scheduler_counts_experiments_by_state(cluster):
    port = read_metrics_port(cluster.services["scheduler"].log_path)
    rpc = {"grpc_service": SCHEDULER_SERVICE, "grpc_type": "unary"}
    with SchedulerClient(cluster.services["scheduler"].address) as client:
        with pytest.raises(InvalidArgument):
            client.submit(builtin_spec("no-such-task"))
        # No node has registered: a valid experiment waits in QUEUED.
        experiment = client.submit(builtin_spec("count", max_steps=2))
        queued = scrape(port)
        client.cancel(experiment.experiment_id)
        cancelled = scrape(port)

    assert (
        sample(
            queued,
            "grpc_server_handled_total",
            grpc_method="SubmitExperiment",
            grpc_code="INVALID_ARGUMENT",
            **rpc,
        )
        == 1
    )
    assert sample(queued, "lorafleet_scheduler_experiments", state="QUEUED") == 1
    assert experiment.state == scheduler_pb2.EXPERIMENT_STATE_QUEUED
    assert sample(cancelled, "lorafleet_scheduler_experiments", state="QUEUED") == 0
    assert (
        sample(cancelled, "lorafleet_scheduler_experiments_finished_total", state="CANCELLED")
        == 1
    )


def test_endpoint_stops_with_the_service(cluster):
    port = read_metrics_port(cluster.services["registry"].log_path)
    assert cluster.stop("registry", timeout_s=15) == 0
    log = cluster.services["registry"].log_path.read_text()
    assert '"metrics_stopped"' in log
    with pytest.raises(urllib.error.URLError):
        scrape(port)
