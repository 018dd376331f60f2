"""Start an order safely and read its status through a Waybill coordinator,
from Python (pip install nats-py).

Usage: python3 start_and_status.py [SERVERS]

The servers are the argument, else $NATS_URL, else nats://127.0.0.1:4222;
each may be one URL or a comma-separated list of a cluster's servers
(the client connects to any live one and fails over to the others)."""
import asyncio
import json
import os
import random
import secrets
import sys
import time
import uuid

import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError

ORDER = {
    "customer": "c-42",
    "items": [{"sku": "SKU-1", "qty": 2, "unit_price_cents": 1250}],
    "payment": {"card": "4242424242424242"},
    "ship_to": {"country": "NL", "zip": "1011 AB"},
}


def servers(spec):
    """`nats://a:4222, b:4223` -> ["nats://a:4222", "nats://b:4223"]."""
    urls = [s.strip() for s in spec.split(",")]
    if not all(urls):
        sys.exit(f"an empty entry in the server list `{spec}`")
    return [u if "://" in u else f"nats://{u}" for u in urls]


def uuid7():
    """A time-ordered UUID (v7): uuid.uuid7() from Python 3.14 on."""
    if hasattr(uuid, "uuid7"):
        return uuid.uuid7()
    b = bytearray((time.time_ns() // 1_000_000).to_bytes(6, "big") + secrets.token_bytes(10))
    b[6] = (b[6] & 0x0F) | 0x70  # version 7
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    return uuid.UUID(bytes=bytes(b))


async def start(nc, workflow, order, give_up=60.0):
    """Starts `order` exactly once, however often it has to be sent.

    The id is chosen here and every try carries it (header Waybill-Order), so
    the coordinator stores the order once: an answer `"duplicate": true` to a
    retry means an earlier try was stored. No answer in time, no coordinator,
    or `"retryable": true` (it could not store the order for now): send the
    same again, with backoff, for at most `give_up` seconds (keep it well
    inside the stream's 2-minute duplicate window). Returns the answer: the
    start, or a refusal for cause (`"retryable": false`: an invalid order, an
    unknown workflow), which sending again would not change."""
    order_id = str(uuid7())
    body = json.dumps(order).encode()
    deadline = time.monotonic() + give_up
    pause = 0.05
    while True:
        try:
            reply = await nc.request(
                f"waybill.start.{workflow}", body, timeout=5, headers={"Waybill-Order": order_id}
            )
            answer = json.loads(reply.data)
            if not answer.get("retryable"):
                return answer
            why = answer["error"]
        except (NatsTimeoutError, NoRespondersError) as e:
            why = f"no answer ({type(e).__name__})"
        if time.monotonic() + pause > deadline:
            raise RuntimeError(
                f"order {order_id} was not confirmed started ({why}); "
                f"it may have been stored: send it again with Waybill-Order: {order_id}"
            )
        print(f"start of {order_id} not confirmed ({why}); trying again", file=sys.stderr)
        await asyncio.sleep(pause * random.uniform(0.5, 1.0))
        pause = min(pause * 2, 2.0)


async def main(spec):
    async def on_error(e):  # one line, not a traceback, for each server it cannot reach
        print(f"nats: {type(e).__name__}: {e}", file=sys.stderr)

    nc = await nats.connect(servers=servers(spec), error_cb=on_error)
    started = await start(nc, "order", ORDER)
    if "error" in started:
        sys.exit(f"start refused: {started['error']}")
    print("started", started["id"])

    # A bad order is refused for cause, with a clear message; nothing is
    # started, and sending it again would not change that.
    refused = await start(nc, "order", dict(ORDER, items=[]))
    print("refused:", refused["error"], "(retryable:", refused.get("retryable"), ")")

    # The order moves on as workers take it; ask until it is finished.
    for _ in range(100):
        reply = await nc.request(f"waybill.status.{started['id']}", b"", timeout=5)
        status = json.loads(reply.data)
        if status.get("status") not in (None, "running", "compensating"):
            break
        await asyncio.sleep(0.1)
    print(status["status"], [(h["step"], h.get("outcome") or h.get("error")) for h in status["history"]])

    reply = await nc.request("waybill.orders", json.dumps({"status": "completed", "limit": 3}).encode(), timeout=5)
    summary = json.loads(reply.data)
    print("tracked", summary["tracked"], "by status", summary["by_status"])
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("NATS_URL") or "nats://127.0.0.1:4222"))
