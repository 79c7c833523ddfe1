"""The broker is real: a record produced with aiokafka is consumed back intact."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def test_produce_consume_round_trip(kafka_bootstrap: str, unique_id: str) -> None:
    topic = f"roundtrip-{unique_id}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        sent = [await producer.send_and_wait(topic, key=f"k{i}".encode(), value=f"v{i}".encode()) for i in range(5)]
    finally:
        await producer.stop()
    assert [meta.offset for meta in sent] == [0, 1, 2, 3, 4]

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        received = []
        while len(received) < 5:
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, "no records within 10 s"
            received += [(r.key, r.value) for records in batch.values() for r in records]
    finally:
        await consumer.stop()
    assert received == [(f"k{i}".encode(), f"v{i}".encode()) for i in range(5)]
