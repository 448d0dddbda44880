"""Targets that name several replicas, and the service config that makes a
channel follow the one whose health entry is SERVING (the routing itself, over
real servers: tests/unit/scheduler/test_sched_replicas.py)."""

from __future__ import annotations

import json

import pytest

from lorafleet.core.channel import (
    channel_options,
    is_replica_set,
    replica_target,
    service_config,
)
from lorafleet.core.errors import InvalidArgument, Unavailable


@pytest.mark.parametrize(
    ("target", "several"),
    [
        ("127.0.0.1:50052", False),
        ("scheduler:50052", False),
        ("a:1,b:2", True),
        ("dns:///scheduler-headless:50052", True),
        ("ipv4:10.0.0.1:1,10.0.0.2:1", True),
    ],
)
def test_which_targets_name_several_replicas(target, several):
    assert is_replica_set(target) is several


def test_a_list_becomes_one_ipv4_target_with_hostnames_resolved():
    assert replica_target("127.0.0.1:1, localhost:2,") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert replica_target("dns:///scheduler:50052") == "dns:///scheduler:50052"


def test_a_list_of_ipv6_replicas_and_a_mixed_list():
    assert replica_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(InvalidArgument) as caught:
        replica_target("127.0.0.1:1,[::1]:2")
    assert caught.value.reason == "ADDRESS_FAMILIES_MIXED"


def test_an_unresolvable_replica_is_named():
    with pytest.raises(Unavailable) as caught:
        replica_target("127.0.0.1:1,no-such-host.invalid:2")
    assert caught.value.reason == "ADDRESS_UNRESOLVED"
    assert caught.value.metadata == {"address": "no-such-host.invalid:2"}


def test_the_service_config_follows_health_only_when_asked():
    plain = json.loads(service_config(retry=True, health_service=None) or "{}")
    assert set(plain) == {"methodConfig"}
    following = json.loads(service_config(retry=True, health_service="pkg.Svc") or "{}")
    assert following["healthCheckConfig"] == {"serviceName": "pkg.Svc"}
    assert following["loadBalancingConfig"] == [{"round_robin": {}}]
    assert service_config(retry=False, health_service=None) is None
    options = dict(channel_options(retry=False, health_service="pkg.Svc"))
    assert json.loads(str(options["grpc.service_config"]))["healthCheckConfig"]
