"""Every service starts as a process on port 0, serves health, answers honestly
for RPCs that belong to later issues, and stops cleanly on SIGTERM."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorafleet.cluster.local import ClusterError, LocalCluster, ServiceSpec, health_status

SERVICE_NAMES = {
    "registry": "lorafleet.registry.v1.AdapterRegistryService",
    "scheduler": "lorafleet.scheduler.v1.SchedulerService",
    "rollout": "lorafleet.rollout.v1.RolloutService",
    "trainer": "lorafleet.trainer.v1.TrainerService",
    "environment": "lorafleet.environment.v1.EnvironmentService",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("services"))
    for service in SERVICE_NAMES:
        cluster.start(ServiceSpec(service, service))
    yield cluster
    cluster.stop_all(timeout_s=10)


@pytest.mark.parametrize("service", sorted(SERVICE_NAMES))
def test_service_process_serves_health(cluster, service):
    address = cluster.wait_serving(service, timeout_s=240)
    assert health_status(address) == "SERVING"
    assert health_status(address, SERVICE_NAMES[service]) == "SERVING"


def test_sigterm_exits_zero(cluster):
    cluster.wait_serving("environment", timeout_s=240)
    assert cluster.stop("environment", timeout_s=15) == 0


def test_a_restarted_service_comes_back_on_its_port_with_its_previous_log_kept(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        address = cluster.start_and_wait(ServiceSpec("environment", "environment"), 240)
        first_log = cluster.services["environment"].log_path.read_text()
        cluster.kill("environment")
        assert health_status(address) != "SERVING"
        assert cluster.restart("environment") == address
        assert health_status(address) == "SERVING"
        previous = cluster.services["environment"].log_path.with_name("environment.log.1")
        assert previous.read_text() == first_log
        with pytest.raises(ClusterError, match="still running"):
            cluster.restart("environment")
    finally:
        cluster.stop_all(timeout_s=10)


def test_bad_config_file_fails_fast_with_a_clear_message(tmp_path):
    config = tmp_path / "scheduler.yaml"
    config.write_text("port: 0\nregistry_adress: 127.0.0.1:1\n")  # typo on purpose
    result = subprocess.run(
        [sys.executable, "-m", "lorafleet.scheduler", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "registry_adress" in result.stderr


def test_misspelt_env_setting_stops_the_start_with_the_closest_name(tmp_path):
    # What a typo under [services.scheduler] of a benchmark config becomes.
    cluster = LocalCluster(tmp_path)
    spec = ServiceSpec("scheduler", "scheduler", env={"LORAFLEET_SCHEDULER_REGISTRY_ADRESS": "x"})
    try:
        with pytest.raises(ClusterError) as info:
            cluster.start(spec)
            cluster.wait_serving("scheduler", timeout_s=60)
    finally:
        cluster.stop_all(timeout_s=10)
    message = str(info.value)
    assert "exited with code 2" in message
    assert "LORAFLEET_SCHEDULER_REGISTRY_ADRESS" in message
    assert "did you mean 'registry_address'?" in message
