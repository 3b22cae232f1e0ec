"""Key -> partition, exactly as Kafka's default partitioner does it.

Both backends use murmur2 (the Java client's ``Utils.murmur2``, via kafka-python),
so a request's impression and feedback land in the same partition and the
embedded log partitions a stream exactly like a Kafka topic with the same
partition count would.
"""

from __future__ import annotations

from functools import lru_cache

from kafka.partitioner.default import murmur2


@lru_cache(maxsize=65536)
def partition_for(key: str, partitions: int) -> int:
    """Partition of ``key`` among ``partitions`` (``toPositive(murmur2(utf8(key))) % n``)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    return (murmur2(key.encode("utf-8")) & 0x7FFFFFFF) % partitions
