"""The worker's loop with its Kafka clients and pipeline replaced by recorders: when a batch is taken,
when it is indexed, and which batches are indexed together. The real clients and pipeline are in
test_worker_e2e.py; here the futures of the decoding stage are settled by hand."""

from __future__ import annotations

from concurrent.futures import Future

from imgdedup import worker as worker_module
from imgdedup.config import Settings
from imgdedup.pipeline import InputRecord, Output, Pending
from imgdedup.worker import Worker


class Message:
    def __init__(self, offset: int):
        self._offset = offset

    def error(self):
        return None

    def topic(self) -> str:
        return "images"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return b"{}"

    def key(self) -> None:
        return None


class Consumer:
    def __init__(self):
        self.waiting: list[Message] = []

    def arrive(self, *offsets: int) -> None:
        self.waiting += [Message(o) for o in offsets]

    def consume(self, n: int, timeout: float) -> list[Message]:
        taken, self.waiting = self.waiting[:n], self.waiting[n:]
        return taken


class Producer:
    def __init__(self):
        self.produced: list[tuple[str, bytes]] = []

    def produce(self, topic, value, key, on_delivery=None) -> None:
        self.produced.append((topic, value))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0


class Pipeline:
    """Submitted batches keep one unsettled future per record; complete records the offsets it got."""

    def __init__(self):
        self.submitted: list[Pending] = []
        self.completed: list[list[int]] = []

    def submit(self, records: list[InputRecord]) -> Pending:
        pending = Pending(records, [None] * len(records), {i: Future() for i in range(len(records))})
        self.submitted.append(pending)
        return pending

    def complete(self, pending: Pending) -> list[Output]:
        self.completed.append([r.offset for r in pending.records])
        return [Output("verdict", None, {"offset": r.offset}, r) for r in pending.records]

    def close(self) -> None:
        pass

    def decode(self, batch: int) -> None:
        for future in self.submitted[batch].prepared.values():
            future.set_result(None)


def loop(batch_size: int = 64) -> tuple[Worker, Consumer, Producer, Pipeline]:
    pipeline = Pipeline()
    worker = Worker(Settings(batch_size=batch_size), pipeline=pipeline)
    worker.consumer, worker.producer = Consumer(), Producer()
    worker.next_sizes = float("inf")  # no index sizes to read from a pipeline without a store
    return worker, worker.consumer, worker.producer, pipeline


def test_an_event_starts_decoding_while_the_batch_before_it_is_still_decoding():
    worker, consumer, producer, pipeline = loop()
    consumer.arrive(0, 1)
    worker._step()
    consumer.arrive(2)
    worker._step()
    assert [[r.offset for r in p.records] for p in pipeline.submitted] == [[0, 1], [2]]
    assert pipeline.completed == [] and producer.produced == []


def test_batches_decoded_together_are_indexed_as_one_in_their_order():
    worker, consumer, producer, pipeline = loop()
    for offset in range(3):
        consumer.arrive(offset)
        worker._step()
    pipeline.decode(1)  # the second batch is decoded, the first is not: nothing may overtake it
    worker._step()
    assert pipeline.completed == []
    pipeline.decode(0)
    worker._step()
    assert pipeline.completed == [[0, 1]]
    pipeline.decode(2)
    worker._step()
    assert pipeline.completed == [[0, 1], [2]]
    assert [value for _, value in producer.produced] == [b'{"offset":0}', b'{"offset":1}', b'{"offset":2}']
    assert not worker.in_flight and worker.tracker.in_flight == 3  # acknowledged only by the broker


def test_with_enough_in_flight_it_indexes_the_oldest_before_taking_more(monkeypatch):
    monkeypatch.setattr(worker_module, "BATCHES_IN_FLIGHT", 2)
    worker, consumer, _, pipeline = loop(batch_size=2)  # so at most 4 events in flight
    consumer.arrive(0)
    worker._step()
    consumer.arrive(1, 2)
    worker._step()
    consumer.arrive(3, 4, 5)
    worker._step()  # 5 in flight: the oldest batch is indexed now, decoded or not (indexing waits for it)
    assert pipeline.completed == [[0]] and [m.offset() for m in consumer.waiting] == [5]
    worker._step()  # still 4 in flight: the next oldest is indexed before anything more is taken
    assert pipeline.completed == [[0], [1, 2]] and [m.offset() for m in consumer.waiting] == [5]
    worker._step()
    assert consumer.waiting == [] and len(worker.in_flight) == 2


def test_stopping_indexes_every_batch_in_flight():
    worker, consumer, producer, pipeline = loop()
    for offset in range(2):
        consumer.arrive(offset)
        worker._step()
    worker.consumer = None  # nothing to commit or close here
    worker._shutdown()
    assert pipeline.completed == [[0, 1]] and len(producer.produced) == 2
