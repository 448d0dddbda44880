from __future__ import annotations

from structlog.testing import capture_logs

from lorafleet.rollout import allocator
from lorafleet.rollout.allocator import preload_tcmalloc, with_tcmalloc

LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_tcmalloc_goes_in_front_of_what_is_preloaded():
    assert with_tcmalloc({}, LIB) == LIB
    assert with_tcmalloc({"LD_PRELOAD": ""}, LIB) == LIB
    assert with_tcmalloc({"LD_PRELOAD": "/x/libgomp.so"}, LIB) == f"{LIB}:/x/libgomp.so"


def test_nothing_to_add_without_the_library_or_with_a_tcmalloc_already_there():
    assert with_tcmalloc({"LD_PRELOAD": "/x/libgomp.so"}, None) is None
    assert with_tcmalloc({"LD_PRELOAD": "/opt/libtcmalloc.so.4"}, LIB) is None


def test_preload_puts_the_library_in_the_environment(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: LIB)
    env = {"LD_PRELOAD": "/x/libgomp.so"}
    with capture_logs() as logs:
        assert preload_tcmalloc(env) == f"{LIB}:/x/libgomp.so"
    assert env["LD_PRELOAD"] == f"{LIB}:/x/libgomp.so"
    assert logs == []
    assert preload_tcmalloc(env) == f"{LIB}:/x/libgomp.so"  # already there: unchanged


def test_missing_library_is_reported_with_the_fix(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    env: dict[str, str] = {}
    with capture_logs() as logs:
        assert preload_tcmalloc(env) is None
    assert env == {}
    (entry,) = logs
    assert entry["event"] == "tcmalloc_not_found" and entry["log_level"] == "warning"
    assert "libtcmalloc-minimal4" in entry["fix"]
