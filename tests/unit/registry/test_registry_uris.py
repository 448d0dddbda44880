"""file:// URIs must stay inside a node root, symlinks included."""

from __future__ import annotations

import os

import pytest

from lorafleet.core.errors import InvalidArgument, NotFound
from lorafleet.registry.uris import FileRoots


@pytest.fixture
def roots(tmp_path):
    (tmp_path / "node-a" / "exp" / "v1").mkdir(parents=True)
    (tmp_path / "node-a" / "exp" / "v1" / "adapter_config.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("s")
    return FileRoots({"node-a": tmp_path / "node-a"})


def test_locate_inside_root(roots, tmp_path):
    location = roots.locate((tmp_path / "node-a" / "exp" / "v1").as_uri())
    assert location.node_id == "node-a"
    with roots.open_file(location, "adapter_config.json") as f:
        assert f.read() == b"{}"
    assert roots.node_of_uri((tmp_path / "node-a" / "x").as_uri()) == "node-a"
    assert roots.node_of_uri((tmp_path / "outside").as_uri()) is None


@pytest.mark.parametrize(
    "make_uri, reason",
    [
        (lambda t: f"file://{t}/node-a/exp/../../outside", "PATH_TRAVERSAL"),
        (lambda t: f"file://{t}/node-a/%2e%2e/outside", "PATH_TRAVERSAL"),
        (lambda t: (t / "outside").as_uri(), "PATH_OUTSIDE_ROOTS"),
        (lambda t: f"file://{t}/node-a-evil", "PATH_OUTSIDE_ROOTS"),
        (lambda t: "relative/path", "UNSUPPORTED_URI_SCHEME"),
        (lambda t: "ftp://host/x", "UNSUPPORTED_URI_SCHEME"),
        (lambda t: "s3://bucket/x", "UNSUPPORTED_URI_SCHEME"),
        (lambda t: f"file://host{t}/node-a/exp/v1", "INVALID_URI"),
        (lambda t: f"file://{t}/node-a/exp/v1?x=1", "INVALID_URI"),
        (lambda t: f"file://{t}/node-a/exp/v1/adapter_config.json", "NOT_A_DIRECTORY"),
    ],
)
def test_locate_refuses(roots, tmp_path, make_uri, reason):
    with pytest.raises(InvalidArgument) as exc:
        roots.locate(make_uri(tmp_path))
    assert exc.value.reason == reason


def test_missing_directory_inside_root_is_not_found(roots, tmp_path):
    with pytest.raises(NotFound) as exc:
        roots.locate((tmp_path / "node-a" / "nope").as_uri())
    assert exc.value.reason == "SOURCE_NOT_FOUND"


def test_symlinks_cannot_escape(roots, tmp_path):
    os.symlink(tmp_path / "outside", tmp_path / "node-a" / "escape")
    with pytest.raises(InvalidArgument) as exc:
        roots.locate((tmp_path / "node-a" / "escape").as_uri())
    assert exc.value.reason == "SYMLINK_ESCAPE"

    v1 = tmp_path / "node-a" / "exp" / "v1"
    os.symlink(tmp_path / "outside" / "secret", v1 / "adapter_model.safetensors")
    location = roots.locate(v1.as_uri())
    with pytest.raises(InvalidArgument) as exc:
        roots.open_file(location, "adapter_model.safetensors")
    assert exc.value.reason == "SYMLINK_REFUSED"


def test_directory_swapped_for_symlink_after_check(roots, tmp_path):
    v1 = tmp_path / "node-a" / "exp" / "v1"
    location = roots.locate(v1.as_uri())
    os.rename(v1, tmp_path / "node-a" / "exp" / "moved")
    os.symlink(tmp_path / "outside", v1)
    with pytest.raises(InvalidArgument) as exc:
        roots.open_file(location, "secret")
    assert exc.value.reason == "SYMLINK_ESCAPE"


def test_symlinked_root_itself_is_fine(tmp_path):
    (tmp_path / "real" / "v1").mkdir(parents=True)
    os.symlink(tmp_path / "real", tmp_path / "link")
    roots = FileRoots({"n": tmp_path / "link"})
    assert roots.locate((tmp_path / "link" / "v1").as_uri()).node_id == "n"
