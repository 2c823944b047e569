"""Talk to Switchboard through Kafka with confluent-kafka (pip install confluent-kafka).

Publishes an outbound request, then follows events.v1 in a consumer group,
committing each event after handling it and skipping ids already seen
(events are delivered at least once).
"""
import json
import os
import sys

from confluent_kafka import Consumer, Producer

brokers = os.environ.get("BROKERS", "127.0.0.1:9092")
prefix = os.environ.get("PREFIX", "switchboard.")
customer_id = sys.argv[1]

producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
request = {
    "schema": "switchboard.outbound.v1",
    "idempotency_key": f"py-reply-{customer_id}",
    "customer_id": customer_id,
    "channel": "api",
    "text": "Sent from Python.",
}
producer.produce(prefix + "outbound.v1", key=customer_id, value=json.dumps(request))
producer.flush(10)

consumer = Consumer({
    "bootstrap.servers": brokers,
    "group.id": os.environ.get("GROUP", "my-service"),
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
})
consumer.subscribe([prefix + "events.v1"])
seen = set()
wanted = int(os.environ.get("EVENTS", "1"))
while len(seen) < wanted:
    msg = consumer.poll(10.0)
    if msg is None:
        break
    if msg.error():
        raise SystemExit(f"kafka error: {msg.error()}")
    event = json.loads(msg.value())
    if event["id"] not in seen:
        seen.add(event["id"])
        print(event["type"], event["customer_id"])
    consumer.commit(message=msg, asynchronous=False)
consumer.close()
