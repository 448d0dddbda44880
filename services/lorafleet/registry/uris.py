"""By-reference URIs: which schemes are allowed and where ``file://`` may point.

A ``file://`` URI names a version directory on a node's adapter cache, which the
registry can read (same machine or a shared mount). It must resolve, symlinks
included, inside the root configured for some node; files are then opened
relative to a descriptor of that directory with ``O_NOFOLLOW``, and the
directory descriptor itself is re-checked, so swapping a path component for a
symlink after the check cannot escape the root either.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from lorafleet.core.errors import DataLoss, InvalidArgument, NotFound

KNOWN_SCHEMES = ("file", "s3")
MAX_URI_LENGTH = 4096


def uri_scheme(uri: str) -> str:
    if len(uri) > MAX_URI_LENGTH or "\x00" in uri:
        raise InvalidArgument("uri is too long or contains NUL", reason="INVALID_URI")
    scheme = urlsplit(uri).scheme.lower()
    if scheme not in KNOWN_SCHEMES:
        raise InvalidArgument(
            f"URI scheme {scheme!r} is not allowed (known: {', '.join(KNOWN_SCHEMES)})",
            reason="UNSUPPORTED_URI_SCHEME",
            metadata={"scheme": scheme},
        )
    return scheme


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclasses.dataclass(frozen=True)
class FileLocation:
    """A version directory that passed the root checks."""

    node_id: str
    root: str
    directory: str
    """Fully resolved (realpath) directory."""


class FileRoots:
    """The node-local cache directories by-reference publishes may come from."""

    def __init__(self, roots: dict[str, Path]) -> None:
        self._configured = {node: os.fspath(path) for node, path in roots.items()}

    @property
    def _roots(self) -> dict[str, str]:
        # Resolved on every use, not once: a root that is a symlink (common for
        # tmpfs mounts) or that a node creates after the registry started must
        # be judged by where it points now.
        return {node: os.path.realpath(path) for node, path in self._configured.items()}

    @property
    def roots(self) -> dict[str, str]:
        return self._roots

    def locate(self, uri: str) -> FileLocation:
        """Check a ``file://`` URI and return where it points.

        Raises:
            InvalidArgument: INVALID_URI, UNSUPPORTED_URI_SCHEME, PATH_TRAVERSAL,
                PATH_OUTSIDE_ROOTS, SYMLINK_ESCAPE, NOT_A_DIRECTORY.
            NotFound: SOURCE_NOT_FOUND.
        """
        if uri_scheme(uri) != "file":
            raise InvalidArgument(
                "only file:// URIs can be published by reference",
                reason="UNSUPPORTED_URI_SCHEME",
                metadata={"scheme": urlsplit(uri).scheme},
            )
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise InvalidArgument(
                "file:// URIs must be file:///absolute/path (no host, query or fragment)",
                reason="INVALID_URI",
            )
        path = unquote(parts.path)
        if "\x00" in path or not path.startswith("/"):
            raise InvalidArgument("file:// path must be absolute", reason="INVALID_URI")
        if ".." in path.split("/"):
            raise InvalidArgument(
                "file:// path must not contain '..'", reason="PATH_TRAVERSAL", metadata={"uri": uri}
            )
        lexical = os.path.normpath(path)
        lexical_node = self._node_of(lexical)
        try:
            real = os.path.realpath(lexical, strict=True)
        except OSError:
            if lexical_node is None:
                raise self._outside(uri) from None
            raise NotFound(
                f"{uri} does not exist", reason="SOURCE_NOT_FOUND", metadata={"uri": uri}
            ) from None
        node = self._node_of(real)
        if node is None:
            if lexical_node is not None:
                raise InvalidArgument(
                    f"{uri} leaves its root through a symlink",
                    reason="SYMLINK_ESCAPE",
                    metadata={"uri": uri},
                )
            raise self._outside(uri)
        if not os.path.isdir(real):
            raise InvalidArgument(
                f"{uri} is not a directory", reason="NOT_A_DIRECTORY", metadata={"uri": uri}
            )
        return FileLocation(
            node_id=node, root=os.path.realpath(self._configured[node]), directory=real
        )

    def node_of_uri(self, uri: str) -> str | None:
        """The node whose root holds ``uri`` (lexically), or None."""
        parts = urlsplit(uri)
        if parts.scheme != "file":
            return None
        return self._node_of(os.path.normpath(unquote(parts.path)))

    def _node_of(self, path: str) -> str | None:
        # Longest root first, so nested roots pick the most specific node.
        roots = self._roots
        for node, root in sorted(roots.items(), key=lambda item: -len(item[1])):
            if _within(path, root):
                return node
        return None

    @staticmethod
    def _outside(uri: str) -> InvalidArgument:
        return InvalidArgument(
            f"{uri} is not inside any configured node root",
            reason="PATH_OUTSIDE_ROOTS",
            metadata={"uri": uri},
        )

    def open_file(self, location: FileLocation, name: str) -> BinaryIO:
        """Open ``name`` inside ``location`` for reading, refusing symlinks and
        anything but a regular file.

        Raises:
            InvalidArgument: SYMLINK_ESCAPE, SYMLINK_REFUSED, NOT_A_REGULAR_FILE.
            NotFound: SOURCE_NOT_FOUND.
        """
        try:
            dir_fd = os.open(location.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(f"{location.directory} is gone", reason="SOURCE_NOT_FOUND") from None
        except OSError:
            raise InvalidArgument(
                "version directory was replaced by a symlink",
                reason="SYMLINK_ESCAPE",
                metadata={"directory": location.directory},
            ) from None
        try:
            # Where the descriptor really points, whatever happened to the path
            # since locate() resolved it (Linux; elsewhere the O_NOFOLLOW opens
            # are the guard).
            if os.path.isdir("/proc/self/fd") and not _within(
                os.path.realpath(f"/proc/self/fd/{dir_fd}"), location.root
            ):
                raise InvalidArgument(
                    "version directory moved outside its root",
                    reason="SYMLINK_ESCAPE",
                    metadata={"directory": location.directory},
                )
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
            except FileNotFoundError:
                raise NotFound(
                    f"{name} is missing in {location.directory}",
                    reason="SOURCE_NOT_FOUND",
                    metadata={"file": name},
                ) from None
            except OSError as exc:
                if os.path.islink(os.path.join(location.directory, name)):
                    raise InvalidArgument(
                        f"{name} is a symlink; publish regular files",
                        reason="SYMLINK_REFUSED",
                        metadata={"file": name},
                    ) from None
                raise DataLoss(
                    f"cannot open {name}: {exc.strerror}", reason="SOURCE_UNREADABLE"
                ) from None
        finally:
            os.close(dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(
                f"{name} is not a regular file",
                reason="NOT_A_REGULAR_FILE",
                metadata={"file": name},
            )
        return os.fdopen(fd, "rb")
