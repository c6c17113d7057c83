#!/usr/bin/env python3
"""Generate the schema-evolution test dataset (written and resolved by Python's fastavro).

Usage:  pip install fastavro && python3 tests/data/evolution/generate.py

Two value schemas of one store, fully compatible (each reads the other's data): schema 2 adds
`headline` (default ""), `address.country` (default "unknown") and `scores` (default null), and
drops `legacy_score` (which has a default, so a schema-1 reader fills it in).

Writes, into the folder this script lives in:
- key.avsc, v1.avsc, v2.avsc
- v1.avro, v2.avro: container files of rows {key, value}, values written with v1 / v2
  (the same 100 keys, different values).
- v1.jsonl: the rows of v1.avro as JSON lines (Rialto's JSON convention).
- expected.jsonl: the oracle, one line per (file, reader schema, key):
  {"file": "v1"|"v2", "reader": 1|2, "key": ..., "value_hex": ...}: the value as fastavro
  resolves it from the writer's schema to the reader's, written with the reader's schema.
Deterministic: fixed seed and sync marker.
"""

import io
import json
import os
import random

import fastavro

OUT = os.path.dirname(os.path.abspath(__file__))
N = 100
SYNC = bytes(range(16))

ADDRESS_V1 = {
    "type": "record",
    "name": "Address",
    "fields": [
        {"name": "city", "type": "string"},
        {"name": "zip", "type": ["null", "string"], "default": None},
    ],
}
ADDRESS_V2 = {
    "type": "record",
    "name": "Address",
    "fields": ADDRESS_V1["fields"] + [{"name": "country", "type": "string", "default": "unknown"}],
}
STATUS = {"type": "enum", "name": "Status", "symbols": ["ACTIVE", "INACTIVE", "BANNED"]}

V1 = {
    "type": "record",
    "name": "Member",
    "namespace": "test.evolution",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "name", "type": "string"},
        {"name": "embedding", "type": {"type": "array", "items": "float"}},
        {"name": "tags", "type": {"type": "map", "values": "long"}},
        {"name": "nickname", "type": ["null", "string"]},
        {"name": "address", "type": ADDRESS_V1},
        {"name": "status", "type": STATUS},
        {"name": "legacy_score", "type": "double", "default": 0.5},
    ],
}
V2 = {
    "type": "record",
    "name": "Member",
    "namespace": "test.evolution",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "name", "type": "string"},
        {"name": "headline", "type": "string", "default": ""},
        {"name": "embedding", "type": {"type": "array", "items": "float"}},
        {"name": "tags", "type": {"type": "map", "values": "long"}},
        {"name": "nickname", "type": ["null", "string"]},
        {"name": "address", "type": ADDRESS_V2},
        {"name": "status", "type": STATUS},
        {"name": "scores", "type": ["null", {"type": "array", "items": "double"}], "default": None},
    ],
}
KEY = "string"
ROW = lambda value: {  # noqa: E731
    "type": "record",
    "name": "Row",
    "namespace": "test.evolution",
    "fields": [{"name": "key", "type": "string"}, {"name": "value", "type": value}],
}


def f32(x):
    import struct

    return struct.unpack("<f", struct.pack("<f", x))[0]


def member(rng, i, v2):
    value = {
        "id": i * 1000 + rng.randrange(1000),
        "name": f"member {i}",
        "embedding": [f32(rng.uniform(-1, 1)) for _ in range(8)],
        "tags": {f"t{j}": rng.randrange(-(2**40), 2**40) for j in sorted(rng.sample(range(20), rng.randrange(0, 4)))},
        "nickname": None if rng.random() < 0.4 else f"nick{i}",
        "address": {"city": rng.choice(["Paris", "Oslo", "Lima"]), "zip": None if rng.random() < 0.5 else str(rng.randrange(10000, 99999))},
        "status": rng.choice(STATUS["symbols"]),
    }
    if v2:
        value["headline"] = f"headline {i}"
        value["address"]["country"] = rng.choice(["FR", "NO", "PE"])
        value["scores"] = None if rng.random() < 0.3 else [rng.uniform(0, 10) for _ in range(rng.randrange(0, 4))]
    else:
        value["legacy_score"] = rng.uniform(0, 1)
    return value


def datum(schema, value):
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), value)
    return out.getvalue()


def resolve(bytes_, writer, reader):
    return fastavro.schemaless_reader(io.BytesIO(bytes_), fastavro.parse_schema(writer), fastavro.parse_schema(reader))


def main():
    rng = random.Random(20261206)
    schemas = {1: V1, 2: V2}
    for name, schema in (("key", KEY), ("v1", V1), ("v2", V2)):
        with open(os.path.join(OUT, f"{name}.avsc"), "w") as f:
            json.dump(schema, f, indent=2)
            f.write("\n")
    expected = []
    for file_name, writer_id in (("v1", 1), ("v2", 2)):
        writer = schemas[writer_id]
        rows = [{"key": f"m-{i:03}", "value": member(rng, i, writer_id == 2)} for i in range(N)]
        with open(os.path.join(OUT, f"{file_name}.avro"), "wb") as f:
            fastavro.writer(f, fastavro.parse_schema(ROW(writer)), rows, codec="deflate", sync_marker=SYNC)
        if writer_id == 1:
            with open(os.path.join(OUT, "v1.jsonl"), "w") as f:
                for row in rows:
                    f.write(json.dumps(row, separators=(",", ":"), sort_keys=False) + "\n")
        for row in rows:
            written = datum(writer, row["value"])
            for reader_id, reader in schemas.items():
                resolved = resolve(written, writer, reader)
                expected.append({
                    "file": file_name,
                    "reader": reader_id,
                    "key": row["key"],
                    "value_hex": datum(reader, resolved).hex(),
                })
            # Self-check: resolution to the writer's own schema is the identity.
            assert datum(writer, resolve(written, writer, writer)) == written
    with open(os.path.join(OUT, "expected.jsonl"), "w") as f:
        for e in expected:
            f.write(json.dumps(e, separators=(",", ":")) + "\n")
    print(f"wrote {len(expected)} expectations")


if __name__ == "__main__":
    main()
