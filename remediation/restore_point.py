"""The restore point, taken from the data: the WAL archive decoded with pg_waldump, and the
first committed transaction that damaged the shop's data found in it.

Damage is what the shop never does: delete from, or update in place, an append-only table
(`orders`, `tx_decisions`, `stock_movements`), unlink a relation's files in a shop database
(DROP TABLE, TRUNCATE), or change `products` in a transaction that inserted no stock movement
(the shop moves stock only with its order). The point is just before that transaction's commit
record (`recovery_target_lsn`, not inclusive). A verified repair leaves a named restore point
(`MARKER`) in the WAL: damage before it is already mended, so the search starts after it."""

from __future__ import annotations

import contextlib
import itertools
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from remediation import pg_ops
from remediation.base import ActionError
from remediation.executors.base import Executor, ExecutorError

APPEND_ONLY = {
    "orders": ("orders", "tx_decisions"),
    "inventory": ("stock_movements", "stock_adjustments"),
}
STOCK = ("inventory", "products")
MOVEMENTS = ("inventory", "stock_movements")
MARKER = "controlplane-repaired"
# pg_waldump's lines: "rmgr: Heap len (rec/tot): 54/ 54, tx: 745, lsn: 0/0301A2B8, prev
# 0/0301A280, desc: DELETE off 5 flags 0x00 KEYS_UPDATED , blkref #0: rel 1663/16384/16390 blk 0"
RECORD = re.compile(
    r"^rmgr: (\w+)\s+len .*?, tx:\s+(\d+), lsn: ([0-9A-F]+/[0-9A-F]+), .*?desc: (.*)$"
)
BLOCK_REL = re.compile(r"rel \d+/(\d+)/(\d+)")
DROPPED = re.compile(r"rels: ((?:base/\d+/\d+ ?)+)")
SUBXACTS = re.compile(r"subxacts: ([\d ]+)")
COMMITTED_AT = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")
DELETE_IS_SUPER = 0x08  # an INSERT … ON CONFLICT that lost its race, not a deletion
FIRST_USER_OID = 16384
LSN = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")


@dataclass(frozen=True, slots=True)
class Damage:
    xid: int
    commit_lsn: str  # the restore point: just before this record
    committed_at: datetime
    what: str  # e.g. "DELETE from orders"


@dataclass(slots=True)
class _Xact:
    did: set[str] = field(default_factory=set)
    moved_stock: bool = False
    updated_stock: bool = False


def lsn_value(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def relations(conns: Mapping[str, str]) -> tuple[dict[tuple[int, int], str], dict[str, int]]:
    """(database oid, relfilenode) -> "db.table" for the tables judged, and the shop
    databases' oids (a DROP there unlinks files no live catalog names any more)."""
    names: dict[tuple[int, int], str] = {}
    dbs: dict[str, int] = {}
    for db, dsn in conns.items():
        tables = [*APPEND_ONLY.get(db, ()), *([STOCK[1]] if db == STOCK[0] else [])]
        with pg_ops.connect(dsn, timeout_s=5) as conn:
            row = conn.execute(
                "SELECT oid FROM pg_database WHERE datname = current_database()"
            ).fetchone()
            assert row is not None
            dbs[db] = int(row[0])
            for table in tables:
                found = conn.execute(
                    "SELECT pg_relation_filenode(to_regclass(%s))", (table,)
                ).fetchone()
                if found and found[0] is not None:
                    names[(int(row[0]), int(found[0]))] = f"{db}.{table}"
    return names, dbs


def timeline_ranges(
    archive_dir: Path, start: int, end: int, timeline: int
) -> list[tuple[int, int, int]]:
    """(timeline, from, to) pieces of [start, end) as the current timeline's history says."""
    switches: list[tuple[int, int]] = []  # (timeline, its end)
    history = archive_dir / f"{timeline:08X}.history"
    if history.exists():
        for line in history.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit() and LSN.match(parts[1]):
                switches.append((int(parts[0]), lsn_value(parts[1])))
    pieces, begin = [], start
    for tli, until in [*switches, (timeline, end)]:
        if until > begin:
            pieces.append((tli, begin, min(until, end)))
            begin = min(until, end)
    return pieces


WAL_FILE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")


def ancestor_segments(archive_dir: Path, pieces: Sequence[tuple[int, int, int]]) -> dict[str, Path]:
    """The archived files that hold each older timeline's WAL in `pieces` (timeline_ranges),
    by the name a reader of that timeline asks for. Before a switch's segment, the old
    timeline's own segments. The switch's own segment is taken from the child timeline,
    which begins as a copy of it up to the switch point: the old timeline's own is often not
    archived whole (a primary stopped by a switchover leaves only the promoted node's
    `.partial`), and when it is, it may go on past the point with writes the switch
    discarded (a failed primary's last moments), which nothing may read as history."""
    segments = [f for f in archive_dir.iterdir() if WAL_FILE.match(f.name)]
    if not segments or len(pieces) < 2:
        return {}
    segment_bytes = segments[0].stat().st_size
    per_log = 0x1_0000_0000 // segment_bytes

    def name(tli: int, segno: int) -> str:
        return f"{tli:08X}{segno // per_log:08X}{segno % per_log:08X}"

    found: dict[str, Path] = {}
    for (tli, begin, until), (child, _, _) in itertools.pairwise(pieces):
        switch = until // segment_bytes
        for segno in range(begin // segment_bytes, switch + 1):
            candidates = (
                [archive_dir / name(child, segno), archive_dir / f"{name(tli, segno)}.partial"]
                if segno == switch
                else [archive_dir / name(tli, segno)]
            )
            source = next((c for c in candidates if c.exists()), None)
            if source is not None:
                found[name(tli, segno)] = source
    return found


@contextlib.contextmanager
def readable_history(archive_dir: Path, pieces: Sequence[tuple[int, int, int]]) -> Iterator[Path]:
    """A directory where every timeline of `pieces` reads whole up to its switch: the
    archive's files, and the ancestors' switch segments as `ancestor_segments` chose them
    (links, in a directory of their own; the archive itself is never written)."""
    extra = ancestor_segments(archive_dir, pieces)
    if not extra:
        yield archive_dir
        return
    linked = Path(tempfile.mkdtemp(prefix="wal-history-"))
    try:
        linked.chmod(0o755)  # read by the tools' OS user
        for entry in archive_dir.iterdir():
            (linked / entry.name).symlink_to(entry)
        for wanted, source in extra.items():
            (linked / wanted).unlink(missing_ok=True)
            (linked / wanted).symlink_to(source)
        yield linked
    finally:
        shutil.rmtree(linked, ignore_errors=True)


def decode(
    executor: Executor, node: str, archive_dir: Path, pieces: Sequence[tuple[int, int, int]]
) -> list[str]:
    with readable_history(archive_dir, pieces) as wal_dir:
        return _decode(executor, node, wal_dir, pieces)


def _decode(
    executor: Executor, node: str, wal_dir: Path, pieces: Iterable[tuple[int, int, int]]
) -> list[str]:
    lines: list[str] = []
    for tli, begin, until in pieces:
        args = [
            "-p",
            str(wal_dir),
            "-t",
            str(tli),
            "-s",
            lsn_text(begin),
            "-e",
            lsn_text(until),
        ]
        for rmgr in ("Heap", "Transaction", "XLOG"):
            args += ["-r", rmgr]
        try:
            lines += executor.run_tool(node, "pg_waldump", args, timeout_s=600).splitlines()
        except ExecutorError as exc:
            raise ActionError(f"cannot decode the WAL archive: {exc}") from exc
    return lines


def first_damage(
    lines: Iterable[str], rels: Mapping[tuple[int, int], str], dbs: Mapping[str, int]
) -> Damage | None:
    """The first damaging transaction, in commit order, after the last repair's marker."""
    xacts: dict[int, _Xact] = {}
    found: Damage | None = None
    for line in lines:
        match = RECORD.match(line)
        if not match:
            continue
        rmgr, xid, lsn, desc = match.group(1), int(match.group(2)), match.group(3), match.group(4)
        if rmgr == "XLOG":
            if desc.startswith(f"RESTORE_POINT {MARKER}"):
                found = None  # mended up to here
            continue
        if rmgr == "Heap":
            note(xacts.setdefault(xid, _Xact()), desc, rels, dbs.get(STOCK[0]))
            continue
        if rmgr != "Transaction" or found is not None:
            continue
        if desc.startswith("COMMIT_PREPARED"):
            xid = int(desc.split()[1].rstrip(":"))
        elif not desc.startswith("COMMIT"):
            if desc.startswith("ABORT"):
                xacts.pop(xid, None)
            continue
        xact = xacts.pop(xid, None) or _Xact()
        subs = SUBXACTS.search(desc)
        for sub in subs.group(1).split() if subs else []:
            part = xacts.pop(int(sub), None)
            if part:
                xact.did |= part.did
                xact.moved_stock |= part.moved_stock
                xact.updated_stock |= part.updated_stock
        dropped = DROPPED.search(desc)
        for path in dropped.group(1).split() if dropped else []:
            _, db, rel = path.split("/")
            if int(db) in dbs.values():
                xact.did.add(
                    f"DROP or TRUNCATE of {rels.get((int(db), int(rel)), 'relation ' + rel)}"
                )
        if xact.updated_stock and not xact.moved_stock:
            xact.did.add("UPDATE of products without a stock movement")
        if xact.did:
            stamp = COMMITTED_AT.search(desc)
            at = datetime.fromisoformat(stamp.group(1) + "+00:00") if stamp else datetime.min
            found = Damage(xid, lsn, at, ", ".join(sorted(xact.did)))
    return found


def note(
    xact: _Xact, desc: str, rels: Mapping[tuple[int, int], str], inventory: int | None
) -> None:
    rel = BLOCK_REL.search(desc)
    if rel is None:
        return
    db, node = int(rel.group(1)), int(rel.group(2))
    table = rels.get((db, node))
    verb = desc.split()[0]
    # A row inserted beside the stock change: the movement (its table maybe since dropped,
    # so unknown to the live catalog; user relations start at 16384).
    inserted = verb.startswith("INSERT") and table != ".".join(STOCK)
    if inserted and db == inventory and node >= FIRST_USER_OID:
        xact.moved_stock = True
    if table is None:
        return
    if table == ".".join(MOVEMENTS) and verb.startswith("INSERT"):
        xact.moved_stock = True
    elif table == ".".join(STOCK) and "UPDATE" in verb:
        xact.updated_stock = True
    elif table != ".".join(STOCK) and verb == "DELETE":
        flags = re.search(r"flags 0x([0-9A-Fa-f]+)", desc)
        if not (flags and int(flags.group(1), 16) & DELETE_IS_SUPER):
            xact.did.add(f"DELETE from {table}")
    elif table != ".".join(STOCK) and "UPDATE" in verb:
        xact.did.add(f"UPDATE in place of {table}")


def backup_start_lsn(backup_path: Path) -> int:
    text = (backup_path / "backup_label").read_text()
    found = re.search(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+)", text, re.M)
    if found is None:
        raise ActionError(f"{backup_path}/backup_label has no start location", permanent=True)
    return lsn_value(found.group(1))


def find_damage(
    executor: Executor,
    node: str,
    conns: Mapping[str, str],
    archive_dir: Path,
    start_lsn: int,
    end_lsn: str,
) -> Damage | None:
    """Decode the archive from `start_lsn` (a backup's start) to `end_lsn` (archived: see
    restore.archive_current_wal) on the leader's timeline and its history."""
    rels, dbs = relations(conns)
    timeline = int(end_lsn_timeline(conns))
    pieces = timeline_ranges(archive_dir, start_lsn, lsn_value(end_lsn), timeline)
    return first_damage(decode(executor, node, archive_dir, pieces), rels, dbs)


def end_lsn_timeline(conns: Mapping[str, str]) -> int:
    dsn = next(iter(conns.values()))
    with pg_ops.connect(dsn, timeout_s=5) as conn:
        row = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()
    assert row is not None
    return int(str(row[0])[:8], 16)


def mark_repaired(dsn: str) -> None:
    """A named point in the WAL: the damage before it is mended."""
    with pg_ops.connect(dsn, timeout_s=5) as conn:
        conn.execute("SELECT pg_create_restore_point(%s)", (MARKER,))
