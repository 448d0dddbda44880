"""The API contract: generated code is fresh, and the protos keep our API rules."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor

ROOT = Path(__file__).resolve().parents[3]

# RPCs that change state must carry a request_id so a retry replays the first
# answer instead of doing the work twice.
STATE_CHANGING = re.compile(
    r"^(Create|Publish|Upload|Delete|Set|Submit|Pause|Resume|Cancel|Push|Register|"
    r"ForwardBackward|OptimStep|TrainStep|Save|Load|Drop|Unload)"
)


def _load_codegen():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _service_descriptors() -> list[descriptor.ServiceDescriptor]:
    from lorafleet.api.environment.v1 import environment_pb2
    from lorafleet.api.registry.v1 import registry_pb2
    from lorafleet.api.rollout.v1 import rollout_pb2
    from lorafleet.api.scheduler.v1 import scheduler_pb2
    from lorafleet.api.trainer.v1 import trainer_pb2

    modules = [registry_pb2, scheduler_pb2, rollout_pb2, trainer_pb2, environment_pb2]
    return [s for m in modules for s in m.DESCRIPTOR.services_by_name.values()]


def test_generated_code_is_fresh():
    stale = _load_codegen().stale_files()
    assert stale == [], f"run `make protos`: generated code is stale for {stale}"


def test_five_services_with_buf_names():
    names = {s.full_name for s in _service_descriptors()}
    assert names == {
        "lorafleet.registry.v1.AdapterRegistryService",
        "lorafleet.scheduler.v1.SchedulerService",
        "lorafleet.rollout.v1.RolloutService",
        "lorafleet.trainer.v1.TrainerService",
        "lorafleet.environment.v1.EnvironmentService",
    }


@pytest.mark.parametrize("service", _service_descriptors(), ids=lambda s: s.name)
def test_one_request_and_response_per_rpc(service):
    for method in service.methods:
        if method.name == "GenerateStream":  # streaming twin of Generate, same request
            continue
        assert method.input_type.name == f"{method.name}Request", method.full_name
        assert method.output_type.name in {
            f"{method.name}Response",
        }, method.full_name


@pytest.mark.parametrize("service", _service_descriptors(), ids=lambda s: s.name)
def test_state_changing_rpcs_carry_request_id(service):
    for method in service.methods:
        if not STATE_CHANGING.match(method.name):
            continue
        request = method.input_type
        if method.name == "UploadVersion":  # the id rides in the stream's header
            request = request.fields_by_name["header"].message_type
        assert "request_id" in request.fields_by_name, method.full_name


def test_enum_zero_values_are_unspecified():
    seen = 0
    for proto in sorted((ROOT / "protos").rglob("*.proto")):
        text = proto.read_text()
        for enum_name, body in re.findall(r"enum (\w+) \{(.*?)\}", text, re.S):
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper()
            first = re.search(r"(\w+) = 0;", body)
            assert first and first.group(1) == f"{prefix}_UNSPECIFIED", (proto.name, enum_name)
            seen += 1
    assert seen >= 5
