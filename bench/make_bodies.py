#!/usr/bin/env python3
"""Writes COUNT signed LABEL_UPDATED bodies of about 2 KiB, one per label, to PATH: one line per
body, `sha1=<hmac>` TAB body (the body is one line of JSON). bench/sustained.lua cycles
through them so that the load spreads over COUNT entities, as real traffic does.

usage: make_bodies.py PATH COUNT SECRET
"""
import hashlib
import hmac
import json
import sys

path, count, secret = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
objects = [
    {"featureId": f"cfeat{i:04d}", "title": "car", "value": "car",
     "bbox": {"top": i, "left": 2 * i, "height": 30, "width": 40}}
    for i in range(12)
]
with open(path, "w") as out:
    for n in range(count):
        body = json.dumps({
            "id": f"clabelsustained{n:010d}",
            "createdAt": "2026-11-01T00:00:00Z",
            "updatedAt": "2026-11-20T10:00:00.123Z",
            "label": json.dumps({"objects": objects, "classifications": []}),
            "project": {"id": "cprojsustained0000000001"},
            "dataRow": {"id": f"cdrowsustained{n:010d}", "externalId": f"img_{n}.jpg"},
            "user": {"id": "cuser", "email": "labeler@example.com"},
        }, separators=(",", ":"))
        sig = hmac.new(secret, body.encode(), hashlib.sha1).hexdigest()
        out.write(f"sha1={sig}\t{body}\n")
