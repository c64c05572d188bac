#!/usr/bin/env python3
"""Writes a Labelbox-shaped LABEL_UPDATED body of about SIZE bytes to PATH, streaming (so a
body of hundreds of MB never sits in memory). The label string is double-encoded, as Labelbox
sends it, and grows with the number of annotations.

usage: make_payload.py PATH SIZE_BYTES
"""
import sys

path, size = sys.argv[1], int(sys.argv[2])
head = (
    b'{"id":"clabelbench00000000000001","createdAt":"2026-11-01T00:00:00Z",'
    b'"updatedAt":"2026-11-20T10:00:00.123Z","project":{"id":"cprojbench000000000000001"},'
    b'"dataRow":{"id":"cdrowbench000000000000001"},"label":"{\\"objects\\":['
)
obj = (
    b'{\\"featureId\\":\\"cfeat\\",\\"title\\":\\"car\\",'
    b'\\"bbox\\":{\\"top\\":1,\\"left\\":2,\\"height\\":3,\\"width\\":4}},'
)
tail = b'{}]}"}'
with open(path, "wb") as out:
    out.write(head)
    left = max(size - len(head) - len(tail), 0)
    block = obj * 1024
    while left >= len(block):
        out.write(block)
        left -= len(block)
    out.write(obj * (left // len(obj)))
    out.write(tail)
