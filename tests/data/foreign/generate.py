#!/usr/bin/env python3
"""Generate the foreign-Avro test dataset (written by Python's fastavro).

Usage:  pip install fastavro cramjam && python3 tests/data/foreign/generate.py

Deterministic: fixed random seed and fixed sync markers, so running it twice
gives byte-identical files (for the same fastavro / cramjam / zlib versions).
Writes into the folder this script lives in; see README.md there.
"""

import copy
import datetime
import decimal
import io
import json
import os
import random
import struct
import sys
import uuid
import zlib

import fastavro

OUT = os.path.dirname(os.path.abspath(__file__))
SEED = 20240607
N_RECORDS = 200
SYNC_INTERVAL = 4096
EMBED_DIM = 64
SCALE = 4
PRECISION = 20
UTC = datetime.timezone.utc
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=UTC)
EPOCH_DATE = datetime.date(1970, 1, 1)

KEY_SCHEMA = "string"

VALUE_SCHEMA = {
    "type": "record",
    "name": "Member",
    "namespace": "test.foreign",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "score", "type": "double"},
        {"name": "ratio", "type": "float"},
        {"name": "embedding", "type": {"type": "array", "items": "float"}},
        {"name": "weights", "type": {"type": "map", "values": "double"}},
        {"name": "nickname", "type": ["null", "string"]},
        {"name": "alt_score", "type": ["null", "double", "string"]},
        {
            "name": "address",
            "type": {
                "type": "record",
                "name": "Address",
                "fields": [
                    {"name": "city", "type": "string"},
                    {"name": "zip", "type": ["null", "int"]},
                    {
                        "name": "geo",
                        "type": {
                            "type": "record",
                            "name": "Geo",
                            "fields": [
                                {"name": "lat", "type": "double"},
                                {"name": "lon", "type": "double"},
                            ],
                        },
                    },
                ],
            },
        },
        {
            "name": "kind",
            "type": {"type": "enum", "name": "Kind", "symbols": ["ADMIN", "MEMBER", "GUEST"]},
        },
        {"name": "blob", "type": "bytes"},
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 16}},
        {
            "name": "balance",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": PRECISION, "scale": SCALE},
        },
        {"name": "ident", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "updated", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "birthday", "type": {"type": "int", "logicalType": "date"}},
    ],
}

ROW_SCHEMA = {
    "type": "record",
    "name": "Row",
    "namespace": "test.foreign",
    "fields": [
        {"name": "key", "type": KEY_SCHEMA},
        {"name": "value", "type": copy.deepcopy(VALUE_SCHEMA)},
    ],
}


# ---------------------------------------------------------------- values ---

def f32(x):
    """Round a Python float to the nearest float32, widened back to a float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def random_double_bits(rng):
    """A double with random bits (any sign/exponent), never NaN or infinity."""
    while True:
        x = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if x == x and x not in (float("inf"), float("-inf")):
            return x


def random_float32_bits(rng):
    while True:
        x = struct.unpack("<f", rng.getrandbits(32).to_bytes(4, "little"))[0]
        if x == x and x not in (float("inf"), float("-inf")):
            return x


def rbytes(rng, n):
    return bytes(rng.getrandbits(8) for _ in range(n))


ID_EDGES = [0, 1, -1, 63, -64, 64, -65, 2**31 - 1, -(2**31), 2**53, 2**53 + 1, -(2**53 + 1),
            2**62 + 7, -(2**63), 2**63 - 1, 2**63 - 2, -(2**63) + 1]

SCORE_EDGES = [0.0, -0.0, 3.0, -3.0, 1e-300, -1e-300, 1.7976931348623157e308,
               -1.7976931348623157e308, 5e-324, -5e-324, 2.2250738585072014e-308,
               2.225073858507201e-308, 0.1, 1 / 3, 1e22, 1e16, 9007199254740993.0,
               123456789.123456789, 0.9418320440936001, 1e21, 1e-7, 100.0, 2.0**63]

RATIO_EDGES = [0.0, -0.0, 1.0, -1.0, f32(0.1), 1.401298464324817e-45, 1.1754943508222875e-38,
               3.4028234663852886e38, -3.4028234663852886e38, f32(16777217.0), f32(1e-10),
               f32(1 / 3)]

EMBED_EDGES = [0.0, -0.0, 1.0, -1.0, f32(0.1), 1.401298464324817e-45, -1.401298464324817e-45,
               1.1754943508222875e-38, 3.4028234663852886e38, -3.4028234663852886e38,
               f32(1e-30), f32(1e30), f32(16777217.0), 16777216.0, 0.5, f32(2.0 / 3)]

NICK_EDGES = ["", "José", "中文名字", "🚀 rocket", 'say "hi"', "back\\slash\\", "line1\nline2",
              "tab\tsep\r\n", "ctrl\x00\x01\x08\x0b\x0c\x1f\x7f", "\u2028\u2029", "\ufeffBOM",
              "max \U0010FFFF", "mixed é中🚀\"\\\n/", "\u00ff\u0100", "null", "</script>",
              "Zoë 👩\u200d💻"]

ALT_STRING_EDGES = ["", "1.5", "null", "NaN", "-0", "1e400", "é🚀"]

CITIES = ["Mountain View", "São Paulo", "北京", "Zürich", "Kraków", "Reykjavík", "", "O'Fallon",
          "Ḩalab", "Москва", "東京", "Llanfair\"pwll\"", "New\nYork", "C:\\Cities"]

ZIP_EDGES = [None, 0, -1, 2**31 - 1, -(2**31), 94043, 1]

WEIGHT_KEYS = ["a", "b", "clicks", "views", "ctr", "é", "中", "🚀", "", "key with space",
               "quote\"", "back\\", "nl\n", "z", "A", "0"]

BLOB_EDGES = [b"", b"\x00", b"\xff", b"\x00" * 64, bytes(range(64)), bytes(range(192, 256)),
              b"\x80", b"\x7f\x80\x00\xff"]

DIGEST_EDGES = [b"\x00" * 16, b"\xff" * 16, bytes(range(16)), bytes(range(240, 256))]

BALANCE_EDGES = ["0.0000", "0.0001", "-0.0001", "1234567890123456.7890", "-1234567890123456.7890",
                 "9999999999999999.9999", "-9999999999999999.9999", "1.0000", "-12.3400",
                 "0.0127", "-0.0127", "0.0128", "-0.0129",
                 # Unscaled values that are exactly -(2^(8k-1)): fastavro encodes them one byte
                 # longer than minimal two's complement (see README).
                 "-0.0128", "-3.2768"]

UUID_EDGES = [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1),
              uuid.UUID("123e4567-e89b-12d3-a456-426614174000")]

UPDATED_EDGES = [
    EPOCH,
    datetime.datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime.datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC),
    datetime.datetime(1, 1, 1, tzinfo=UTC),
    datetime.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime.datetime(1900, 1, 1, tzinfo=UTC),
    datetime.datetime(1969, 7, 20, 20, 17, 40, tzinfo=UTC),
    datetime.datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC),
    datetime.datetime(3000, 1, 1, tzinfo=UTC),
    datetime.datetime(2024, 2, 29, 12, 30, 15, 123000,
                      tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
    datetime.datetime(1955, 11, 5, 6, 15, 0, 999000,
                      tzinfo=datetime.timezone(datetime.timedelta(hours=-8))),
]

BIRTHDAY_EDGES = [EPOCH_DATE, datetime.date(1969, 12, 31), datetime.date(1, 1, 1),
                  datetime.date(9999, 12, 31), datetime.date(1900, 2, 28),
                  datetime.date(2000, 2, 29), datetime.date(1582, 10, 15)]

MIN_MS = (datetime.datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // datetime.timedelta(milliseconds=1)
MAX_MS = (datetime.datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - EPOCH) // datetime.timedelta(milliseconds=1)
MIN_DAY = (datetime.date(1, 1, 1) - EPOCH_DATE).days
MAX_DAY = (datetime.date(9999, 12, 31) - EPOCH_DATE).days


def edge_or(edges, i, fn):
    return edges[i] if i < len(edges) else fn()


def random_nickname(rng):
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-"
    specials = ["é", "ü", "ß", "中", "文", "🚀", "😀", '"', "\\", "\n", "\t", "\x01", "\x1f", "/", "'"]
    s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
    for _ in range(rng.randint(0, 3)):
        pos = rng.randint(0, len(s))
        s = s[:pos] + rng.choice(specials) + s[pos:]
    return s


def random_score(rng):
    r = rng.random()
    if r < 0.6:
        x = rng.random()
    elif r < 0.8:
        x = rng.random() * 10.0 ** rng.randint(-300, 300)
    else:
        x = random_double_bits(rng)
    return -x if rng.random() < 0.3 else x


def random_ratio(rng):
    return f32(rng.random()) if rng.random() < 0.8 else random_float32_bits(rng)


def random_balance(rng):
    digits = rng.randint(1, PRECISION)
    unscaled = rng.randint(-(10**digits) + 1, 10**digits - 1)
    return decimal.Decimal(f"{unscaled}E-{SCALE}")


def random_updated(rng):
    if rng.random() < 0.5:  # mostly around "now"
        lo, hi = 0, 4102444800000  # 1970 .. 2100
    else:
        lo, hi = MIN_MS, MAX_MS
    dt = EPOCH + datetime.timedelta(milliseconds=rng.randint(lo, hi))
    if rng.random() < 0.3:
        dt = dt.astimezone(datetime.timezone(datetime.timedelta(minutes=15 * rng.randint(-48, 56))))
    return dt


def random_birthday(rng):
    if rng.random() < 0.7:
        return EPOCH_DATE + datetime.timedelta(days=rng.randint(-40000, 20000))
    return EPOCH_DATE + datetime.timedelta(days=rng.randint(MIN_DAY, MAX_DAY))


def make_member(rng, i):
    embedding = [f32(rng.uniform(-1.0, 1.0)) for _ in range(EMBED_DIM)]
    if i < 4:  # sprinkle edge floats into the first few embeddings
        for j, v in enumerate(EMBED_EDGES):
            embedding[(j * 4 + i) % EMBED_DIM] = v
    keys = rng.sample(WEIGHT_KEYS, rng.randint(0, 5))  # random (unsorted) insertion order
    weights = {k: random_score(rng) for k in keys}

    if i < len(NICK_EDGES):
        nickname = NICK_EDGES[i]
    elif i % 3 == 0:
        nickname = None
    else:
        nickname = random_nickname(rng)

    branch = i % 3
    if branch == 0:
        alt_score = None
    elif branch == 1:
        alt_score = edge_or(SCORE_EDGES, i // 3, lambda: random_score(rng))
    else:
        alt_score = edge_or(ALT_STRING_EDGES, i // 3, lambda: random_nickname(rng))

    address = {
        "city": rng.choice(CITIES) if i >= len(CITIES) else CITIES[i],
        "zip": edge_or(ZIP_EDGES, i, lambda: None if rng.random() < 0.25 else rng.randint(0, 99999)),
        "geo": {
            "lat": edge_or([0.0, -0.0, 90.0, -90.0], i, lambda: rng.uniform(-90.0, 90.0)),
            "lon": edge_or([-0.0, 0.0, 180.0, -180.0], i, lambda: rng.uniform(-180.0, 180.0)),
        },
    }

    return {
        "id": edge_or(ID_EDGES, i, lambda: rng.randint(-1000, 1000) if rng.random() < 0.4
                      else rng.getrandbits(64) - 2**63),
        "score": edge_or(SCORE_EDGES, i, lambda: random_score(rng)),
        "ratio": edge_or(RATIO_EDGES, i, lambda: random_ratio(rng)),
        "embedding": embedding,
        "weights": weights,
        "nickname": nickname,
        "alt_score": alt_score,
        "address": address,
        "kind": ["ADMIN", "MEMBER", "GUEST"][i % 3] if i < 3 else rng.choice(["ADMIN", "MEMBER", "GUEST"]),
        "blob": edge_or(BLOB_EDGES, i, lambda: rbytes(rng, rng.randint(0, 64))),
        "digest": edge_or(DIGEST_EDGES, i, lambda: rbytes(rng, 16)),
        "balance": decimal.Decimal(BALANCE_EDGES[i]) if i < len(BALANCE_EDGES) else random_balance(rng),
        "ident": edge_or(UUID_EDGES, i, lambda: uuid.UUID(int=rng.getrandbits(128), version=4)),
        "updated": edge_or(UPDATED_EDGES, i, lambda: random_updated(rng)),
        "birthday": edge_or(BIRTHDAY_EDGES, i, lambda: random_birthday(rng)),
    }


# ---------------------------------------------------------- JSON convention ---

def latin1(data):
    return "".join(chr(b) for b in data)


def decimal_json(d):
    s = format(d.quantize(decimal.Decimal(1).scaleb(-SCALE)), "f")
    assert "e" not in s.lower() and len(s.split(".")[1]) == SCALE, s
    return s


def member_to_json(m):
    """The member in Rialto's JSON convention (see README.md)."""
    return {
        "id": m["id"],
        "score": m["score"],
        "ratio": m["ratio"],
        "embedding": list(m["embedding"]),
        "weights": dict(m["weights"]),
        "nickname": m["nickname"],
        "alt_score": m["alt_score"],
        "address": {
            "city": m["address"]["city"],
            "zip": m["address"]["zip"],
            "geo": {"lat": m["address"]["geo"]["lat"], "lon": m["address"]["geo"]["lon"]},
        },
        "kind": m["kind"],
        "blob": latin1(m["blob"]),
        "digest": latin1(m["digest"]),
        "balance": decimal_json(m["balance"]),
        "ident": str(m["ident"]),
        "updated": (m["updated"] - EPOCH) // datetime.timedelta(milliseconds=1),
        "birthday": (m["birthday"] - EPOCH_DATE).days,
    }


def json_to_member(j):
    """Inverse of member_to_json, producing fastavro input (used for verification)."""
    m = dict(j)
    m["address"] = dict(j["address"])
    m["blob"] = j["blob"].encode("latin-1")
    m["digest"] = j["digest"].encode("latin-1")
    m["balance"] = decimal.Decimal(j["balance"])
    return m  # ident/updated/birthday: fastavro accepts the raw string/int forms


# ----------------------------------------------------------------- output ---

def schemaless(schema, datum):
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, datum)
    return buf.getvalue()


def write_text(name, text):
    with open(os.path.join(OUT, name), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def count_blocks(path, rows_expected):
    """Walk the container file by hand: returns (codec, blocks, rows, sync marker count)."""
    with open(path, "rb") as f:
        data = f.read()
    dec = io.BytesIO(data)
    hdr = fastavro.schemaless_reader(dec, {
        "type": "record", "name": "org.apache.avro.file.Header", "fields": [
            {"name": "magic", "type": {"type": "fixed", "name": "Magic", "size": 4}},
            {"name": "meta", "type": {"type": "map", "values": "bytes"}},
            {"name": "sync", "type": {"type": "fixed", "name": "Sync", "size": 16}}]})
    assert hdr["magic"] == b"Obj\x01"
    sync = hdr["sync"]
    codec = hdr["meta"]["avro.codec"].decode()

    def read_long():
        shift = n = 0
        while True:
            b = dec.read(1)[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return (n >> 1) ^ -(n & 1)

    blocks = rows = 0
    while dec.tell() < len(data):
        cnt = read_long()
        size = read_long()
        payload = dec.read(size)
        assert dec.read(16) == sync
        if codec == "deflate":
            d = zlib.decompressobj(-15)
            raw = d.decompress(payload)
            assert d.eof
        elif codec == "snappy":
            import cramjam
            raw = bytes(cramjam.snappy.decompress_raw(payload[:-4]))
            assert struct.unpack(">I", payload[-4:])[0] == zlib.crc32(raw)
        else:
            raw = payload
        assert len(raw) > 0
        blocks += 1
        rows += cnt
    assert rows == rows_expected, (rows, rows_expected)
    return hdr, blocks, data.count(sync)


def main():
    rng = random.Random(SEED)
    keys = [f"member-{i:05d}" for i in range(N_RECORDS)]
    members = [make_member(rng, i) for i in range(N_RECORDS)]
    rows = [{"key": k, "value": m} for k, m in zip(keys, members)]
    assert len(set(keys)) == len(keys)

    sync_rng = random.Random(SEED + 1)
    for codec in ("deflate", "snappy"):
        path = os.path.join(OUT, f"members.{codec}.avro")
        with open(path, "wb") as f:
            fastavro.writer(f, copy.deepcopy(ROW_SCHEMA), rows, codec=codec,
                            sync_interval=SYNC_INTERVAL, sync_marker=rbytes(sync_rng, 16))

    json_lines = [json.dumps({"key": k, "value": member_to_json(m)}, separators=(",", ":"))
                  for k, m in zip(keys, members)]
    write_text("members.jsonl", "".join(line + "\n" for line in json_lines))

    parsed_key = fastavro.parse_schema(KEY_SCHEMA)
    parsed_value = fastavro.parse_schema(copy.deepcopy(VALUE_SCHEMA))
    expected = [(schemaless(parsed_key, k), schemaless(parsed_value, m)) for k, m in zip(keys, members)]
    write_text("expected.jsonl", "".join(
        json.dumps({"key_hex": kb.hex(), "value_hex": vb.hex()}) + "\n" for kb, vb in expected))

    write_text("key.avsc", json.dumps(KEY_SCHEMA) + "\n")
    write_text("value.avsc", json.dumps(VALUE_SCHEMA, indent=2) + "\n")

    verify(keys, members, rows, expected, parsed_key, parsed_value)


def verify(keys, members, rows, expected, parsed_key, parsed_value):
    parsed_row = fastavro.parse_schema(copy.deepcopy(ROW_SCHEMA))
    # 1. Container files read back equal to the generated rows, and re-encode to the oracle bytes.
    for codec in ("deflate", "snappy"):
        path = os.path.join(OUT, f"members.{codec}.avro")
        with open(path, "rb") as f:
            rdr = fastavro.reader(f)
            assert rdr.codec == codec
            assert rdr.metadata["avro.schema"] == json.dumps(ROW_SCHEMA)
            got = list(rdr)
        assert len(got) == len(rows)
        for g, r, (kb, vb) in zip(got, rows, expected):
            assert g == r, (codec, r["key"])
            assert schemaless(parsed_key, g["key"]) == kb
            assert schemaless(parsed_value, g["value"]) == vb
        hdr, blocks, syncs = count_blocks(path, len(rows))
        assert blocks >= 5 and syncs == blocks + 1, (blocks, syncs)
        print(f"{os.path.basename(path)}: {os.path.getsize(path)} bytes, {blocks} blocks, "
              f"{syncs} sync markers, meta keys {list(hdr['meta'])}")

    # 2. members.jsonl lines line up with expected.jsonl and re-encode to the oracle bytes.
    with open(os.path.join(OUT, "members.jsonl"), encoding="utf-8") as f:
        jl = f.read().split("\n")
    with open(os.path.join(OUT, "expected.jsonl"), encoding="utf-8") as f:
        el = f.read().split("\n")
    assert jl[-1] == "" and el[-1] == "" and len(jl) == len(el) == len(rows) + 1
    for line, eline, k, m in zip(jl, el, keys, members):
        assert line.isascii()
        j = json.loads(line)
        e = json.loads(eline)
        assert j["key"] == k and list(j) == ["key", "value"]
        kb, vb = bytes.fromhex(e["key_hex"]), bytes.fromhex(e["value_hex"])
        assert schemaless(parsed_key, j["key"]) == kb
        assert schemaless(parsed_value, json_to_member(j["value"])) == vb, k
        # 3. The oracle decodes back to the generated record.
        assert fastavro.schemaless_reader(io.BytesIO(kb), parsed_key) == k
        assert fastavro.schemaless_reader(io.BytesIO(vb), parsed_value) == m, k

    for name in sorted(os.listdir(OUT)):
        size = os.path.getsize(os.path.join(OUT, name))
        assert size < 400_000, (name, size)
    print(f"ok: {len(rows)} records, fastavro {fastavro.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}")


if __name__ == "__main__":
    sys.exit(main())
