from __future__ import annotations

from lorafleet.rollout.allocator import with_tcmalloc

LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def test_tcmalloc_goes_in_front_of_what_is_preloaded():
    assert with_tcmalloc({}, LIB) == LIB
    assert with_tcmalloc({"LD_PRELOAD": ""}, LIB) == LIB
    assert with_tcmalloc({"LD_PRELOAD": "/x/libgomp.so"}, LIB) == f"{LIB}:/x/libgomp.so"


def test_nothing_to_add_without_the_library_or_with_a_tcmalloc_already_there():
    assert with_tcmalloc({"LD_PRELOAD": "/x/libgomp.so"}, None) is None
    assert with_tcmalloc({"LD_PRELOAD": "/opt/libtcmalloc.so.4"}, LIB) is None

