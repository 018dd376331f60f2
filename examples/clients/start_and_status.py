"""Start an order and read its status through a Waybill coordinator, from
Python (pip install nats-py). Usage: python3 start_and_status.py [NATS_URL]"""
import asyncio
import json
import sys

import nats

ORDER = {
    "customer": "c-42",
    "items": [{"sku": "SKU-1", "qty": 2, "unit_price_cents": 1250}],
    "payment": {"card": "4242424242424242"},
    "ship_to": {"country": "NL", "zip": "1011 AB"},
}


async def main(url):
    nc = await nats.connect(url)
    reply = await nc.request("waybill.start.order", json.dumps(ORDER).encode(), timeout=5)
    started = json.loads(reply.data)
    if "error" in started:
        sys.exit(f"start refused: {started['error']}")
    print("started", started["id"])

    # A bad order is refused with a clear message, and nothing is started.
    bad = dict(ORDER, items=[])
    reply = await nc.request("waybill.start.order", json.dumps(bad).encode(), timeout=5)
    print("refused:", json.loads(reply.data)["error"])

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


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
