"""Micro-benchmarks behind two choices in the hot paths (``python -m bench.micro``).

1. Publishing: CPU per confirmed persistent message to a quorum queue, through aio-pika's
   ``Message`` + ``Exchange.publish`` (what the bus did) and through ``RabbitMQBus.publish_many``
   (aiormq's ``basic_publish`` directly, without the drain wait), ``--messages`` in batches of
   500 with every message of a batch in flight at once, the relay's nine headers on each;
   after each, consuming them back through ``RabbitMQBus.consume`` (prefetch 256), acking
   each (the first two runs: what a delivery handled alone costs) or ``ack_many`` per 64 (the
   last two: one multiple ack per handled batch).
2. Streams: CPU per entry written with ``RabbitMQBus.write_stream`` (batches of 500, the
   relay's headers, confirmed), then per entry handed out by ``consume_stream`` and settled
   (what reaches a stream subscriber's handler): the path that replaced a queue delivery per
   subscriber. The issue's aim is 30 us per stream event.
3. A read-model-sized PostgreSQL transaction (BEGIN, two SELECTs, an UPDATE, COMMIT) through
   psycopg's async connection, with and without pipeline mode: CPU per transaction.

CPU is this process's (``time.process_time``), the figure that bounds a one-process runtime.
Each variant runs twice, alternating, after nothing else; compare within one run. Uses its
own RabbitMQ virtual host and a temporary table on ``--dsn``; both are gone at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

import aio_pika
import psycopg
from aio_pika import DeliveryMode, Message

from bench.common import Vhost, load_average
from runtime.bus.protocol import (
    Binding,
    BusPlan,
    Delivery,
    ExchangeSpec,
    Outgoing,
    QueueSpec,
    StreamSpec,
    StreamWrite,
)
from runtime.bus.rabbitmq import RabbitMQBus

AMQP_BASE = os.environ.get("MAGASIN_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DSN = os.environ.get("MAGASIN_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
EXCHANGE = "micro.events"
BATCH = 500
HEADERS: dict[str, str | int] = {
    "x-correlation-id": str(uuid.uuid4()),
    "x-causation-id": str(uuid.uuid4()),
    "x-aggregate-id": "acc-00001",
    "x-aggregate-type": "account",
    "x-version": 3,
    "x-event-type": "Deposited",
    "x-schema-version": 1,
    "x-position": 123_456,
    "x-ordering-key": "acc-00001",
}
BODY = b"x" * 400


async def cpu_per_item(count: int, run: Callable[[], Awaitable[None]]) -> float:
    """Microseconds of this process's CPU per item for ``run`` (which handles ``count``)."""
    started = time.process_time()
    await run()
    return (time.process_time() - started) / count * 1e6


async def publishing(amqp_url: str, messages: int) -> list[tuple[str, float]]:
    bus = await RabbitMQBus.connect(amqp_url, name="magasin-bench-micro")
    queue = QueueSpec("micro.sink", bindings=(Binding(EXCHANGE, "#"),))
    await bus.declare(BusPlan(exchanges=(ExchangeSpec(EXCHANGE),), queues=(queue,)))
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    exchange = await channel.get_exchange(EXCHANGE)

    async def via_aio_pika() -> None:
        for _ in range(messages // BATCH):
            await asyncio.gather(
                *(
                    exchange.publish(
                        Message(
                            BODY,
                            headers=dict(HEADERS),
                            message_id=str(uuid.uuid4()),
                            delivery_mode=DeliveryMode.PERSISTENT,
                        ),
                        "account.Deposited",
                        mandatory=True,
                    )
                    for _ in range(BATCH)
                )
            )

    async def via_publish_many() -> None:
        for _ in range(messages // BATCH):
            await bus.publish_many(
                [
                    Outgoing(EXCHANGE, "account.Deposited", BODY, str(uuid.uuid4()), HEADERS)
                    for _ in range(BATCH)
                ]
            )

    async def consume_and_ack() -> None:
        async with bus.consume(queue.name, prefetch=256) as deliveries:
            received = 0
            async for delivery in deliveries:
                await bus.ack(delivery)
                received += 1
                if received == messages:
                    return

    async def consume_and_ack_batches() -> None:
        """As an actor's worker settles a handled batch: ``ack_many`` per 64."""
        async with bus.consume(queue.name, prefetch=256) as deliveries:
            received = 0
            batch: list[Delivery] = []
            async for delivery in deliveries:
                batch.append(delivery)
                received += 1
                if len(batch) == 64 or received == messages:
                    await bus.ack_many(batch)
                    batch = []
                if received == messages:
                    return

    results = []
    consumers = (
        ("  then RabbitMQBus.consume + ack", consume_and_ack),
        ("  then consume + ack_many per 64", consume_and_ack_batches),
    )
    try:
        for index, (name, run) in enumerate(
            (
                ("aio-pika Message + Exchange.publish", via_aio_pika),
                ("RabbitMQBus.publish_many", via_publish_many),
            )
            * 2
        ):
            results.append((name, await cpu_per_item(messages, run)))
            # Each publishing run fills the queue: take the messages off again, measured.
            label, consume = consumers[index // 2]
            results.append((label, await cpu_per_item(messages, consume)))
    finally:
        await connection.close()
        await bus.close()
    return results


async def streaming(amqp_url: str, messages: int) -> list[tuple[str, float]]:
    bus = await RabbitMQBus.connect(amqp_url, name="magasin-bench-micro-stream")
    stream = "micro.stream"
    queue = QueueSpec("micro.subscriber")
    await bus.declare(BusPlan(queues=(queue,), streams=(StreamSpec(stream),)))
    body = b'{"payload": "' + b"x" * 380 + b'"}'
    written = 0

    async def write() -> None:
        nonlocal written
        for _ in range(messages // BATCH):
            await bus.write_stream(
                stream,
                "micro",
                [
                    StreamWrite(
                        written + i + 1, "account.Deposited", str(uuid.uuid4()), body, HEADERS
                    )
                    for i in range(BATCH)
                ],
            )
            written += BATCH

    async def read_and_settle(start: int) -> None:
        async with bus.consume_stream(
            stream, queue=queue.name, offset=start, routing_keys=["account.#"], prefetch=1000
        ) as deliveries:
            received = 0
            async for delivery in deliveries:
                await bus.ack(delivery)
                received += 1
                if received == messages:
                    return

    results = []
    try:
        for _ in range(2):
            start = written
            results.append(("RabbitMQBus.write_stream", await cpu_per_item(messages, write)))
            results.append(
                (
                    "  then consume_stream + ack",
                    await cpu_per_item(messages, partial(read_and_settle, start)),
                )
            )
    finally:
        await bus.close()
    return results


async def transactions(dsn: str, count: int) -> list[tuple[str, float]]:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute("CREATE TEMP TABLE micro (k text PRIMARY KEY, v integer)")
    await conn.execute("INSERT INTO micro VALUES ('a', 1)")

    async def statements() -> None:
        cur = await conn.execute("SELECT v FROM micro WHERE k = %s", ("a",))
        await cur.fetchall()
        cur = await conn.execute("SELECT v FROM micro WHERE k = %s", ("b",))
        await cur.fetchall()
        await conn.execute("UPDATE micro SET v = v + 1 WHERE k = %s", ("a",))

    async def plain() -> None:
        for _ in range(count):
            async with conn.transaction():
                await statements()

    async def pipelined() -> None:
        for _ in range(count):
            async with conn.pipeline(), conn.transaction():
                await statements()

    results = []
    try:
        await plain()  # warm-up: prepared statements, caches
        for name, run in (("one statement at a time", plain), ("pipeline mode", pipelined)) * 2:
            results.append((name, await cpu_per_item(count, run)))
    finally:
        await conn.close()
    return results


def report(title: str, unit: str, rows: Sequence[tuple[str, float]]) -> None:
    print(title)
    for name, value in rows:
        print(f"  {name:<40} {value:8.0f} {unit}")


async def main(args: argparse.Namespace) -> None:
    vhost = Vhost(AMQP_BASE, f"magasin_bench_{uuid.uuid4().hex[:12]}")
    try:
        amqp_url = vhost.create()
        report(
            f"publishing {args.messages:,} confirmed messages, batches of {BATCH}:",
            "us CPU/message",
            await publishing(amqp_url, args.messages),
        )
        report(
            f"streams: {args.messages:,} entries, batches of {BATCH}:",
            "us CPU/entry",
            await streaming(amqp_url, args.messages),
        )
    finally:
        vhost.delete()
    report(
        f"{args.transactions:,} transactions of BEGIN, 2 SELECT, UPDATE, COMMIT:",
        "us CPU/transaction",
        await transactions(args.dsn, args.transactions),
    )
    print(f"load average at the end {load_average()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m bench.micro", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--dsn", default=DSN)
    asyncio.run(main(parser.parse_args()))
