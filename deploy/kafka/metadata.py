#!/usr/bin/env python3
"""Asks a Kafka broker for its metadata, for deploy/kafka/kafka.sh (standard library only).

    metadata.py ready HOST:PORT    exit 0 once the broker answers a Metadata request and names
                                   itself at HOST:PORT among the brokers; 1 otherwise
    metadata.py topics HOST:PORT   "NAME PARTITIONS" per topic, sorted, internal topics left out

Why not Kafka's own tools: each is a JVM start (~2.5 s of CPU on two cores), and `ready` is
polled several times a second while the broker starts. A Metadata request is the first thing
every client sends, so an answer naming our listener means clients can work.

The request is Metadata v4 (the oldest version Kafka 4 still serves, KIP-896), non-flexible,
so it is a few fixed fields: header (api_key 3, version 4, correlation id, client id), then
topics = null (all) and allow_auto_topic_creation = false.
"""

import socket
import struct
import sys

METADATA = 3
VERSION = 4
CLIENT_ID = b"kafka.sh"
TIMEOUT_S = 2


def request(host, port):
    body = struct.pack(">hhih", METADATA, VERSION, 1, len(CLIENT_ID)) + CLIENT_ID
    body += struct.pack(">i?", -1, False)
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as s:
        s.settimeout(TIMEOUT_S)
        s.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", read_exactly(s, 4))
        return read_exactly(s, size)


def read_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("the broker closed the connection")
        buf += chunk
    return buf


class Reader:
    def __init__(self, buf):
        self.buf, self.at = buf, 0

    def take(self, fmt):
        values = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return values if len(values) > 1 else values[0]

    def string(self):
        n = self.take(">h")
        if n < 0:
            return None
        s = self.buf[self.at:self.at + n].decode()
        self.at += n
        return s


def parse(buf):
    """(brokers [(id, host, port)], topics {name: partitions}) from a v4 response."""
    r = Reader(buf)
    r.take(">i")  # correlation id
    r.take(">i")  # throttle_time_ms
    brokers = []
    for _ in range(r.take(">i")):
        node = r.take(">i")
        host = r.string()
        port = r.take(">i")
        r.string()  # rack
        brokers.append((node, host, port))
    r.string()  # cluster id
    r.take(">i")  # controller id
    topics = {}
    for _ in range(r.take(">i")):
        r.take(">h")  # error code
        name = r.string()
        internal = r.take(">?")
        partitions = r.take(">i")
        for _ in range(partitions):
            r.take(">hii")  # error code, partition index, leader (no epoch before v7)
            for _ in range(2):  # replicas, isr (no offline replicas before v5)
                r.take(f">{r.take('>i')}i")
        if not internal:
            topics[name] = partitions
    return brokers, topics


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("ready", "topics"):
        sys.exit(__doc__)
    host, _, port = sys.argv[2].rpartition(":")
    try:
        brokers, topics = parse(request(host, int(port)))
    except (OSError, EOFError, struct.error) as e:
        print(f"metadata.py: {sys.argv[2]}: {e}", file=sys.stderr)
        sys.exit(1)
    if sys.argv[1] == "ready":
        sys.exit(0 if any((h, p) == (host, int(port)) for _, h, p in brokers) else 1)
    for name in sorted(topics):
        print(name, topics[name])


if __name__ == "__main__":
    main()
