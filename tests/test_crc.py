"""``crc32_combine``: the whole's CRC-32 from its parts', as ``zlib.crc32`` of the whole."""

from __future__ import annotations

import random
import zlib

import pytest

from jorb.crc import crc32_combine


@pytest.mark.parametrize("seed", range(5))
def test_combining_the_parts_gives_the_whole(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        a = rng.randbytes(rng.randrange(0, 2_000))
        b = rng.randbytes(rng.choice([0, 1, 7, rng.randrange(0, 70_000)]))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_many_pieces_fold_into_the_file_crc() -> None:
    """As a snapshot sums its pieces: a running CRC, each piece combined in turn."""
    rng = random.Random(42)
    pieces = [rng.randbytes(rng.randrange(0, 300_000)) for _ in range(40)]
    crc = 0
    for piece in pieces:
        crc = crc32_combine(crc, zlib.crc32(piece), len(piece))
    assert crc == zlib.crc32(b"".join(pieces))


def test_lengths_at_every_power_of_two() -> None:
    """Each bit of the length takes its own power of x: try each one up to 16 MB."""
    head = b"jorb"
    for bits in range(25):
        for length in (1 << bits, (1 << bits) + 1, (1 << bits) - 1):
            tail = bytes(length)
            expected = zlib.crc32(head + tail)
            assert crc32_combine(zlib.crc32(head), zlib.crc32(tail), length) == expected
