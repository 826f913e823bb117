"""An independent writer of MarketStore data directories, following the byte layout of
shared/reference/marketstore.md §1.1-1.7 (not sharing code with mkts' Rust reader).

It writes what MarketStore's writer would write: category_name files, 37,024-byte headers, FIXED records at
their interval slots (1D: 0-based index, §1.3), VARIABLE blobs of tick records whose IntervalTicks come from
MarketStore's writer formula (GetIntervalTicks32Bit, with its uint32 wraparound), Snappy block compressed or
not, and WAL files (STATUS, TXNINFO, TGDATA with MD5).

It also computes what MarketStore's *reader* returns for those bytes (IndexToTime, GetTimeFromTicks), so the
tests compare the import against MarketStore's served values, not against what was once written.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import cramjam

HEADER = 37024
DAY_NS = 86_400 * 10**9
C = 49710.269629629629629629629629629  # (2^32-1)/86400 as MarketStore spells it

# element type code -> (struct format, size)
TYPES = {
    0: ("<f", 4), 1: ("<i", 4), 2: ("<d", 8), 3: ("<q", 8), 5: ("<b", 1), 6: ("<?", 1), 9: ("<h", 2),
    10: ("<B", 1), 11: ("<H", 2), 12: ("<I", 4), 13: ("<Q", 8), 14: (None, 64),
}
TF_NS = {"1Sec": 10**9, "1Min": 60 * 10**9, "5Min": 300 * 10**9, "1H": 3600 * 10**9, "1D": DAY_NS}


def jan1(year: int) -> int:
    return int(datetime(year, 1, 1, tzinfo=timezone.utc).timestamp())


def utc_year(epoch: int) -> int:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).year


def year_days(year: int) -> int:
    return (jan1(year + 1) - jan1(year)) // 86400


def pack_value(code: int, v) -> bytes:
    fmt, size = TYPES[code]
    if code == 14:
        s = str(v)[:16]
        return b"".join(struct.pack("<I", ord(ch)) for ch in s).ljust(64, b"\0")
    return struct.pack(fmt, v)


def served_value(code: int, v):
    """The value MarketStore serves for `v` stored as `code` (float32 rounding, string16 truncation)."""
    if code == 0:
        return struct.unpack("<f", struct.pack("<f", v))[0]
    if code == 14:
        return str(v)[:16].rstrip("\0")
    if code == 6:
        return bool(v)
    return v


def time_to_index(epoch: int, tf_ns: int) -> int:
    """TimeToIndex in UTC: 1D is dayOfYear-1 (0-based), others 1 + (t - Jan1) / tf."""
    y = utc_year(epoch)
    if tf_ns == DAY_NS:
        return (epoch - jan1(y)) // 86400
    return 1 + (epoch - jan1(y)) * 10**9 // tf_ns


def index_to_epoch(index: int, tf_ns: int, year: int) -> int:
    """IndexToTime(...).Unix() in UTC."""
    if tf_ns == DAY_NS:
        return jan1(year) + index * 86400
    return jan1(year) + (tf_ns * (index - 1)) // 10**9


def interval_ticks(epoch: int, nanos: int, index: int, ipd: int) -> int:
    """GetIntervalTicks32Bit: base in UTC, (index-1)*86400/ipd whole seconds; uint32(float) wraps like amd64."""
    y = utc_year(epoch)
    second_of_year = int(float(index - 1) * float(86400) / float(ipd))
    base_ns = (jan1(y) + second_of_year) * 10**9
    d = epoch * 10**9 + nanos - base_ns
    seconds = float(d // 10**9) + float(d % 10**9) / 1e9
    v = float(ipd) * C * seconds
    return int(v) & 0xFFFFFFFF  # CVTTSD2SQ truncation toward zero, low 32 bits


def go_round(x: float) -> float:
    r = math.floor(x)
    return r + 1 if x - r >= 0.5 else r


def time_from_ticks(start: int, ipd: int, ticks: int) -> tuple[int, int]:
    """GetTimeFromTicks: what MarketStore's reader returns."""
    frac = ticks / (ipd * C)
    sub = 1e9 * (frac - math.floor(frac))
    if sub >= 1e9:
        sub -= 1e9
        frac += 1
    sec = start + int(go_round(frac * 1e8) / 1e8)
    return sec, int(sub + 0.5)


@dataclass
class Bucket:
    sym: str
    tf: str
    group: str
    columns: list  # [(name, code)]
    variable: bool
    # FIXED: {(year, index): payload}; VARIABLE: {(year, index): [record bytes]}
    slots: dict = field(default_factory=dict)

    @property
    def tf_ns(self) -> int:
        return TF_NS[self.tf]

    @property
    def key(self) -> str:
        return f"{self.sym}/{self.tf}/{self.group}"

    @property
    def payload_len(self) -> int:
        return sum(TYPES[c][1] for _, c in self.columns)

    @property
    def record_length(self) -> int:
        if self.variable:
            return 24
        return 8 + (self.payload_len + 7) // 8 * 8

    def payload(self, values) -> bytes:
        return b"".join(pack_value(c, v) for (_, c), v in zip(self.columns, values))


class MarketStoreRoot:
    def __init__(self, root: Path, compressed: bool = True):
        self.root = Path(root)
        self.compressed = compressed
        self.buckets: dict[str, Bucket] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "category_name").write_bytes(b"Symbol")

    def bucket(self, key: str, columns, variable: bool) -> Bucket:
        sym, tf, group = key.split("/")
        b = self.buckets.get(key)
        if b is None:
            b = Bucket(sym, tf, group, list(columns), variable)
            self.buckets[key] = b
        return b

    # -- data ------------------------------------------------------------------------------------------
    def write_fixed(self, key: str, columns, rows):
        """rows: [(epoch, values)]; last write to a slot wins."""
        b = self.bucket(key, columns, False)
        for epoch, values in rows:
            b.slots[(utc_year(epoch), time_to_index(epoch, b.tf_ns))] = b.payload(values)

    def tick_record(self, b: Bucket, epoch: int, nanos: int, values) -> tuple[int, int, bytes]:
        ipd = DAY_NS // b.tf_ns
        idx = time_to_index(epoch, b.tf_ns)
        t = interval_ticks(epoch, nanos, idx, ipd)
        return utc_year(epoch), idx, b.payload(values) + struct.pack("<I", t)

    def write_variable(self, key: str, columns, rows):
        """rows: [(epoch, nanos, values)]: appended to their intervals, stable-sorted by ticks."""
        b = self.bucket(key, columns, True)
        for epoch, nanos, values in rows:
            y, idx, rec = self.tick_record(b, epoch, nanos, values)
            b.slots.setdefault((y, idx), []).append(rec)

    def flush(self):
        for b in self.buckets.values():
            d = self.root / b.sym
            d.mkdir(exist_ok=True)
            (d / "category_name").write_bytes(b"Timeframe")
            d = d / b.tf
            d.mkdir(exist_ok=True)
            (d / "category_name").write_bytes(b"AttributeGroup")
            d = d / b.group
            d.mkdir(exist_ok=True)
            (d / "category_name").write_bytes(b"Year")
            for year in sorted({y for y, _ in b.slots}):
                self._write_year(b, d / f"{year}.bin", year)

    def header(self, b: Bucket, year: int) -> bytes:
        h = bytearray(HEADER)
        struct.pack_into("<q", h, 0, 2)
        h[8:8 + 17] = b"Created By Writer"
        struct.pack_into("<qqqqq", h, 264, year, b.tf_ns, 1 if b.variable else 0, len(b.columns), b.record_length)
        for i, (name, code) in enumerate(b.columns):
            nb = name.encode()
            h[312 + 32 * i: 312 + 32 * i + len(nb)] = nb
            h[33080 + i] = code
        return bytes(h)

    def _write_year(self, b: Bucket, path: Path, year: int):
        nslots = year_days(year) * DAY_NS // b.tf_ns
        size = HEADER + nslots * b.record_length
        with open(path, "wb") as f:
            f.write(self.header(b, year))
            f.truncate(size)  # sparse, as MarketStore's ftruncate
            for (y, idx), val in sorted(b.slots.items()):
                if y != year:
                    continue
                off = HEADER + (idx - 1) * b.record_length
                if not b.variable:
                    if off < HEADER:
                        # 1D Jan 1 (index 0): MarketStore writes it into the header's reserved tail.
                        f.seek(off)
                        f.write(struct.pack("<q", idx) + val)
                        continue
                    f.seek(off)
                    f.write(struct.pack("<q", idx) + val)
                else:
                    recs = sorted(val, key=lambda r: struct.unpack("<I", r[-4:])[0])  # stable
                    blob = b"".join(recs)
                    if self.compressed:
                        blob = bytes(cramjam.snappy.compress_raw(blob))
                    f.seek(0, os.SEEK_END)
                    boff = f.tell()
                    f.write(blob)
                    f.seek(off)
                    f.write(struct.pack("<qqq", idx, boff, len(blob)))

    # -- WAL -------------------------------------------------------------------------------------------
    def wal(self, name_ns: int = 1_600_000_000_000_000_000) -> "Wal":
        return Wal(self, self.root / f"WALFile.{name_ns}.walfile")

    # -- what MarketStore's reader serves ----------------------------------------------------------------
    def served(self, key: str, extra_variable: dict | None = None) -> list[tuple]:
        """Rows MarketStore returns: (Epoch, [Nanoseconds,] values...), in file order."""
        b = self.buckets[key]
        out = []
        ipd = DAY_NS // b.tf_ns
        slots = dict(b.slots)
        for (y, idx), val in sorted(slots.items()):
            if idx == 0:
                continue  # the 1D Jan 1 quirk: never read back
            start = index_to_epoch(idx, b.tf_ns, y)
            if not b.variable:
                out.append((start, *self.unpack(b, val)))
            else:
                recs = sorted(val, key=lambda r: struct.unpack("<I", r[-4:])[0])
                for r in recs:
                    sec, ns = time_from_ticks(start, ipd, struct.unpack("<I", r[-4:])[0])
                    out.append((sec, ns, *self.unpack(b, r[:-4])))
        return out

    @staticmethod
    def unpack(b: Bucket, payload: bytes) -> list:
        vals, at = [], 0
        for _, code in b.columns:
            fmt, size = TYPES[code]
            raw = payload[at:at + size]
            at += size
            if code == 14:
                cps = [struct.unpack("<I", raw[i:i + 4])[0] for i in range(0, 64, 4)]
                while cps and cps[-1] == 0:
                    cps.pop()
                vals.append("".join(chr(c) for c in cps))
            else:
                vals.append(struct.unpack(fmt, raw)[0])
        return vals


class Wal:
    """A MarketStore WAL file: STATUS (OPEN, NOTREPLAYED), then transaction groups."""

    def __init__(self, root: MarketStoreRoot, path: Path):
        self.root, self.path = root, path
        self.buf = bytearray(struct.pack("<bbbq", 2, 1, 1, 1_600_000_000_000_000_000))

    def txn(self, tgid: int, dest: int, status: int):
        self.buf += struct.pack("<bqbb", 1, tgid, dest, status)

    def group(self, tgid: int, writes: list[tuple]) -> bytes:
        """writes: [(record_type, key_path, var_rec_len, offset, index, data, dsv)]; returns the message."""
        tg = struct.pack("<qq", tgid, len(writes))
        for rt, kp, vrl, off, idx, data, dsv in writes:
            kb = kp.encode()
            tg += struct.pack("<bh", rt, len(kb)) + kb + struct.pack("<ii", len(data), vrl) + struct.pack("<qq", off, idx) + data
            tg += bytes([len(dsv)]) + b"".join(bytes([len(n)]) + n.encode() + bytes([t]) for n, t in dsv)
        ln = struct.pack("<q", len(tg))
        return bytes([0]) + ln + tg + hashlib.md5(ln + tg).digest()

    def commit(self, tgid: int, writes: list[tuple]):
        """What FlushToWAL writes: TXNINFO(PREPARING), TGDATA, TXNINFO(COMMITCOMPLETE), all to the WAL."""
        self.txn(tgid, 0, 0)
        self.buf += self.group(tgid, writes)
        self.txn(tgid, 0, 2)

    def checkpoint(self, tgid: int):
        self.txn(tgid, 1, 0)
        self.txn(tgid, 1, 2)

    def fixed_write(self, key: str, epoch: int, values) -> tuple:
        b = self.root.buckets[key]
        idx = time_to_index(epoch, b.tf_ns)
        dsv = [("Epoch", 3)] + list(b.columns)
        return (0, f"{key}/{utc_year(epoch)}.bin", b.payload_len + 4, HEADER + (idx - 1) * b.record_length, idx, b.payload(values), dsv)

    def variable_write(self, key: str, rows) -> tuple:
        """One interval's tick records (all rows must share the interval)."""
        b = self.root.buckets[key]
        recs, y, idx = b"", None, None
        for epoch, nanos, values in rows:
            y, idx, rec = self.root.tick_record(b, epoch, nanos, values)
            recs += rec
        dsv = [("Epoch", 3)] + list(b.columns) + [("Nanoseconds", 1)]
        return (1, f"{key}/{y}.bin", b.payload_len + 4, HEADER + (idx - 1) * 24, idx, recs, dsv)

    def save(self, torn_tail: bytes = b""):
        self.path.write_bytes(bytes(self.buf) + torn_tail)


def apply_fixed_served(served: list[tuple], epoch_values: dict) -> list[tuple]:
    """Rows after upserting {interval epoch: values} into fixed served rows."""
    d = {r[0]: r for r in served}
    for e, vals in epoch_values.items():
        d[e] = (e, *vals)
    return [d[k] for k in sorted(d)]
