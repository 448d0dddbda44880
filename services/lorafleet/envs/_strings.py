"""Random-string helpers shared by the string tasks."""

from __future__ import annotations

import random

from lorafleet.envs.types import TaskParams

LOWERCASE = "abcdefghijklmnopqrstuvwxyz"


def random_string(rng: random.Random, alphabet: str, min_len: int, max_len: int) -> str:
    length = rng.randint(min_len, max_len)
    return "".join(rng.choice(alphabet) for _ in range(length))


def check_alphabet(params: TaskParams, alphabet: str) -> None:
    params._require(len(alphabet) >= 2, "alphabet needs at least 2 characters")
    params._require(len(set(alphabet)) == len(alphabet), "alphabet has repeated characters")
    params._require(
        all(c.isascii() and c.isprintable() and c not in " =" for c in alphabet),
        "alphabet must be printable ASCII without space or '='",
    )


def check_lengths(params: TaskParams, min_len: int, max_len: int, limit: int = 32) -> None:
    params._require(
        1 <= min_len <= max_len, f"need 1 <= min_len <= max_len, got {min_len}, {max_len}"
    )
    params._require(max_len <= limit, f"max_len must be at most {limit}, got {max_len}")
