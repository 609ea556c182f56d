"""HL7 v2 ADT throughput over real MLLP sockets: msg/s and p50/p99 ACK latency, 1 and 8 connections.

    .venv/bin/python bench/hl7_throughput.py [-n 4000] [--connections 1,8]            # SQLite
    .venv/bin/python bench/hl7_throughput.py --postgres-url postgresql+psycopg://clinphoto:clinphoto@127.0.0.1:5432/clinphoto_test
                                                                                       # SQLite, then PostgreSQL
    .venv/bin/python bench/hl7_throughput.py --host 127.0.0.1 --port 2575 [-n 4000]    # against a running one
    .venv/bin/python bench/hl7_throughput.py --connections 1,8,1x8                     # 1x8: one connection, up
                                                                     # to 8 messages sent ahead of their ACKs

Without --port it starts `clinphoto serve` (MLLP only) on an empty store for each backend: SQLite in a
temporary folder (synchronous=FULL, so every ACK follows a durable commit), and, with --postgres-url, a
schema of its own in that PostgreSQL database (dropped afterwards). Beside each backend's rounds, measured in
the same run (machines here are noisy: compare ratios, not absolute rates): the backend's commit limit
(durable one-row commits a second), a bare round trip (PostgreSQL), and the round trips (PostgreSQL, from
libpq's protocol trace) or statements (SQLite) a message costs through the group commit, in process. Each
round also prints the CPU a message cost the gateway, the PostgreSQL cluster (its postmaster's processes, when
this machine runs it: anyone else's work on that cluster counts too) and this client: on a shared machine
the CPU a message costs is steadier than msg/s, and (their sum) / (cores) bounds what the machine can do.
The messages are a mix of A01 (40%: new patient + encounter), A08 (30%:
update with encounter), A31 (20%: person update, half of them registering a
duplicate record under a second MRN) and A40 (10%: that duplicate merged into
an existing patient), with valid NHS numbers; every ACK is checked (AA, and for the oldest message unanswered on
its connection: "not AA" counts any other answer, or one out of order).
Targets: >= 800 msg/s on one connection, >= 2,000 msg/s over 8.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.policy_query import PgSchema  # noqa: E402  (one throw-away schema helper for the benches)
from gateway.core.nhs import check_digit  # noqa: E402
from gateway.hl7.mllp import MllpDecoder, frame  # noqa: E402


def nhs_number(n: int) -> str:
    while True:
        base = f"{900000000 + n:09d}"
        d = check_digit(base)
        if d is not None:
            return base + str(d)
        n += 7919  # skip nine-digit stems with no valid check digit


class Synth:
    """Synthetic ADT for one connection: its own patients, so connections do not fight over rows."""

    def __init__(self, run: str, conn: int) -> None:
        self.run, self.conn, self.seq, self.patients = run, conn, 0, []
        self.duplicate = ""

    def _msh(self, event: str, structure: str) -> str:
        self.seq += 1
        return (f"MSH|^~\\&|BENCHPAS|RX1|CLINPHOTO|RX1|20240301{10 + self.seq % 10:02d}{self.seq % 60:02d}00||"
                f"ADT^{event}^{structure}|{self.run}-{self.conn}-{self.seq}|P|2.4|||||GBR|UNICODE UTF-8")

    def _pid(self, k: int, family: str = "BENCH") -> str:
        nhs = nhs_number(self.conn * 10_000_000 + k * 13)
        return (f"PID|1||{nhs}^^^NHS^NH~B{self.run}{self.conn}x{k}^^^RX1^MR||{family}^PAT^X^^MR||19800101|F|||"
                f"1 STREET^^LEEDS^^LS1 1AA^GBR")

    def _pv1(self, k: int) -> str:
        return f"PV1|1|I|WARD{k % 9}^B^{k % 20}^RX1||||C1^DOC^ONE^^^DR|||PLS||||19|||||V{self.run}{self.conn}x{k}"

    def next(self) -> bytes:
        i = self.seq
        kind = i % 10
        if kind < 4 or not self.patients:  # 40% A01: a new patient and admission
            k = len(self.patients)
            self.patients.append(k)
            segs = [self._msh("A01", "ADT_A01"), "EVN|A01|20240301100000", self._pid(k), self._pv1(k)]
        elif kind < 7:  # 30% A08: demographics and visit update
            k = self.patients[i % len(self.patients)]
            segs = [self._msh("A08", "ADT_A01"), "EVN|A08|20240301110000", self._pid(k, "UPDATED"), self._pv1(k)]
        elif kind == 7:  # 10% A31: person update
            k = self.patients[(i * 7) % len(self.patients)]
            segs = [self._msh("A31", "ADT_A05"), "EVN|A31|20240301110000", self._pid(k, "PERSON"), "PV1|1|N"]
        elif kind == 8:  # 10% A31 from a second registration: a duplicate record under another MRN
            self.duplicate = f"D{self.run}{self.conn}x{i}"
            segs = [self._msh("A31", "ADT_A05"), "EVN|A31|20240301110000",
                    f"PID|1||{self.duplicate}^^^RX1^MR||BENCH^PAT^X||19800101|F", "PV1|1|N"]
        else:  # 10% A40: that duplicate merged into an existing patient
            k = self.patients[(i * 3) % len(self.patients)]
            segs = [self._msh("A40", "ADT_A39"), "EVN|A40|20240301120000", self._pid(k),
                    f"MRG|{self.duplicate}^^^RX1^MR"]
        return ("\r".join(segs) + "\r").encode()


def connection(host: str, port: int, synth: Synth, count: int, latencies: list[float], bad: list[int],
               start: threading.Barrier, window: int = 1) -> None:
    """One MLLP client, the way a PAS sends: one message, wait for its ACK, the next (blocking socket: the
    client's own overhead per round trip stays small). With window > 1, up to that many messages unanswered (a
    sender that does not wait for each ACK): each ACK must answer the oldest message still unanswered."""
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    decoder = MllpDecoder()
    raws = [synth.next() for _ in range(count)]
    messages = [frame(raw) for raw in raws]
    control_ids = [raw.split(b"\r", 1)[0].split(b"|")[9] for raw in raws]
    mine: list[float] = []
    sent: deque[tuple[bytes, float]] = deque()  # control id and send time of each message not yet answered
    start.wait()
    following = 0
    while following < len(messages) or sent:
        while following < len(messages) and len(sent) < window:
            sent.append((control_ids[following], time.perf_counter()))
            sock.sendall(messages[following])
            following += 1
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("gateway closed the connection")
        for ack in decoder.feed(chunk)[0]:
            control_id, t0 = sent.popleft()
            mine.append(time.perf_counter() - t0)
            msa = next((seg.split(b"|") for seg in ack.split(b"\r") if seg.startswith(b"MSA|")), [])
            if msa[1:3] != [b"AA", control_id]:  # an AA, and for this message: answers in the order sent
                bad.append(1)
                if len(bad) <= 3:
                    print("  not AA for", control_id.decode(), ":", ack.replace(b"\r", b" | ").decode(errors="replace")[:300],
                          file=sys.stderr)
    sock.close()
    latencies.extend(mine)


def run_round(host: str, port: int, n: int, conns: int, run: str, window: int = 1) -> dict:
    latencies: list[float] = []
    bad: list[int] = []
    per = n // conns
    start = threading.Barrier(conns + 1)
    threads = [threading.Thread(target=connection, args=(host, port, Synth(run, c), per, latencies, bad, start, window))
               for c in range(conns)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "connections": f"{conns}x{window}" if window > 1 else conns, "messages": per * conns, "seconds": elapsed,
        "rate": per * conns / elapsed,
        "p50_ms": statistics.median(latencies) * 1000, "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "not_aa": len(bad),
    }


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU of the gateway process (Linux): load on the machine does not change it."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def server_cpu_seconds(url: str | None) -> float | None:
    """CPU of the PostgreSQL cluster serving `url` (the postmaster's children: backends, WAL writer...), Linux, when
    readable (same machine, permission): with the gateway's and the client's, the whole CPU a message costs.
    Anyone else's work on that cluster counts too."""
    if url is None:
        return None
    try:
        import psycopg

        with psycopg.connect(url.split("?")[0].replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
            row = c.execute("SELECT pg_backend_pid()").fetchone()
        master = int(Path(f"/proc/{row[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its postmaster
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == master:
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):  # a process that ended meanwhile
                continue
        return total
    except Exception:
        return None


def per(before: float | None, after: float | None, messages: int) -> str:
    """CPU milliseconds a message, or '-' when not measured."""
    return f"{(after - before) * 1000 / messages:.3f}" if before is not None and after is not None else "-"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(tmp: Path, database_url: str | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
    env.update({"CLINPHOTO_DATA_DIR": str(tmp), "CLINPHOTO_MLLP_PORT": str(port), "CLINPHOTO_LISTENERS": '["mllp"]',
                "CLINPHOTO_LOG_LEVEL": "WARNING"})
    if database_url:
        env["CLINPHOTO_DATABASE_URL"] = database_url
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], cwd=ROOT, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError as err:
            if proc.poll() is not None:
                raise SystemExit(f"gateway exited with {proc.returncode}") from err
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("gateway did not start listening within 60 s")


def commit_limit(url: str, n: int = 300) -> float:
    """Durable one-row commits a second on this backend (the gateway's settings: WAL + FULL on SQLite)."""
    from store.db import Database

    db = Database(url)
    try:
        with db.engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS bench_commit (x INTEGER)")
            conn.commit()
            t = time.perf_counter()
            for i in range(n):
                conn.exec_driver_sql(f"INSERT INTO bench_commit VALUES ({i})")
                conn.commit()
            rate = n / (time.perf_counter() - t)
            conn.exec_driver_sql("DROP TABLE bench_commit")
            conn.commit()
        return rate
    finally:
        db.dispose()


def round_trip_us(url: str, n: int = 2000) -> float:
    """A bare round trip to PostgreSQL (SELECT 1 on an autocommit connection), microseconds."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        cur = conn.cursor()
        t = time.perf_counter()
        for _ in range(n):
            cur.execute("SELECT 1")
            cur.fetchone()
        return (time.perf_counter() - t) / n * 1e6


def cost_per_message(url: str, n: int = 400) -> tuple[str, float]:
    """What one message costs the group commit on this backend, replayed in process on a fresh store, one message
    per transaction (the one-connection case): PostgreSQL round trips counted off libpq's protocol trace (every
    Sync, Query or Flush the client sends is a wait for the server) on every connection the store opened;
    SQLite statements counted by sqlite3's trace callback."""
    from sqlalchemy import event

    from gateway.hl7.committer import GroupCommitter
    from gateway.hl7.config import Hl7Settings
    from gateway.hl7.listener import build_processor
    from store.audit import load_or_create_key
    from store.db import Database
    from store.migrate import upgrade

    tmp = Path(tempfile.mkdtemp(prefix="clinphoto-cost-"))
    db = Database(url, audit_key=load_or_create_key(tmp / "audit.key"), audit_anchor_dir=tmp)
    upgrade(db)
    traced: list[tuple[Any, Any]] = []
    statements = [0]

    @event.listens_for(db.engine, "connect")
    def _trace(dbapi: Any, _record: Any) -> None:
        if db.dialect == "postgresql":
            from psycopg import pq

            f = tempfile.TemporaryFile()
            dbapi.pgconn.trace(f.fileno())
            dbapi.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
            traced.append((dbapi, f))
        else:
            dbapi.set_trace_callback(lambda _sql: statements.__setitem__(0, statements[0] + 1))

    db.engine.dispose()  # the connections upgrade() opened are not traced
    processor = build_processor(Hl7Settings())
    committer = GroupCommitter(db, processor)
    synth = Synth(uuid.uuid4().hex[:6], 0)
    messages = [synth.next() for _ in range(n + 50)]
    for raw in messages[:50]:  # past the first messages (the audit trail's start, the first ids drawn)
        committer.apply_now([processor.prepare(raw)])

    def waits() -> int:
        total = 0
        for dbapi, f in traced:
            if not dbapi.closed:
                dbapi.pgconn.untrace()  # flushes libpq's buffer
            f.seek(0)
            total += sum(1 for line in f.read().decode(errors="replace").splitlines()
                         if line.startswith("F\t") and line.split("\t")[2].split(" ")[0] in ("Sync", "Query", "Flush"))
            if not dbapi.closed:
                from psycopg import pq

                dbapi.pgconn.trace(f.fileno())
                dbapi.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        return total

    before, stmts0 = waits(), statements[0]
    for raw in messages[50:]:
        committer.apply_now([processor.prepare(raw)])
    cost = ("round trips", (waits() - before) / n) if db.dialect == "postgresql" else ("statements", (statements[0] - stmts0) / n)
    committer.stop()
    db.dispose()
    return cost


def run_backend(label: str, args: argparse.Namespace, rounds: list[tuple[int, int]], database_url: str | None) -> None:
    with tempfile.TemporaryDirectory(prefix="clinphoto-bench-") as tmp:
        url = database_url or f"sqlite:///{tmp}/anchor.db"
        anchors = [f"commit limit {commit_limit(url):,.0f}/s"]
        if database_url:
            anchors.append(f"round trip {round_trip_us(url):.0f} us")
        what, per_message = cost_per_message(database_url or f"sqlite:///{tmp}/cost.db")
        anchors.append(f"{per_message:.2f} {what}/message")
        proc, port = start_gateway(Path(tmp), database_url)
        try:
            run = uuid.uuid4().hex[:6]
            run_round(args.host, port, min(200, args.messages), 1, run + "w")  # warm-up
            for i, (conns, window) in enumerate(rounds):
                cpu0, server0, client0 = cpu_seconds(proc.pid), server_cpu_seconds(database_url), os.times()
                r = run_round(args.host, port, args.messages, conns, f"{run}{i}", window)
                cpu1, server1, client1 = cpu_seconds(proc.pid), server_cpu_seconds(database_url), os.times()

                n = r["messages"]
                client = per(client0.user + client0.system, client1.user + client1.system, n)
                print(f"{label:>10} {r['connections']:>11} {r['messages']:>9} {r['rate']:>8.0f} {r['p50_ms']:>7.2f} "
                      f"{r['p99_ms']:>7.2f} {r['not_aa']:>6} {per(cpu0, cpu1, n):>19} {per(server0, server1, n):>10} "
                      f"{client:>10}", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"{label:>10} anchors: {', '.join(anchors)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=4000, help="messages per round")
    ap.add_argument("--connections", default="1,8", help="comma-separated connection counts, one round each; CxW: C "
                    "connections each with up to W messages unanswered (a sender that does not wait for each ACK)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, help="a running gateway's MLLP port; default: start one per backend")
    ap.add_argument("--database-url", help="the one database for the gateway this starts (instead of the backends below)")
    ap.add_argument("--postgres-url", help="also run on PostgreSQL, in a schema of its own in this database")
    ap.add_argument("--no-sqlite", action="store_true", help="with --postgres-url: PostgreSQL only")
    args = ap.parse_args()
    rounds = [(int(c.split("x")[0]), int(c.split("x")[1]) if "x" in c else 1) for c in args.connections.split(",")]
    header = (f"{'backend':>10} {'connections':>11} {'messages':>9} {'msg/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'not AA':>6}"
              f" {'gateway CPU ms/msg':>19} {'server':>10} {'client':>10}")
    if args.port is not None:
        print(header)
        run = uuid.uuid4().hex[:6]
        for i, (conns, window) in enumerate(rounds):
            r = run_round(args.host, args.port, args.messages, conns, f"{run}{i}", window)
            print(f"{'running':>10} {r['connections']:>11} {r['messages']:>9} {r['rate']:>8.0f} {r['p50_ms']:>7.2f} "
                  f"{r['p99_ms']:>7.2f} {r['not_aa']:>6} {'-':>19}")
        return
    backends: list[tuple[str, Callable[[], tuple[str | None, Callable[[], None]]]]] = []
    if args.database_url:
        backends.append(("given", lambda: (args.database_url, lambda: None)))
    else:
        if not args.no_sqlite:
            backends.append(("sqlite", lambda: (None, lambda: None)))
        if args.postgres_url:
            def pg() -> tuple[str | None, Callable[[], None]]:
                schema = PgSchema(args.postgres_url)
                return schema.url, schema.drop
            backends.append(("postgresql", pg))
    print(header, flush=True)
    for label, make in backends:
        url, cleanup = make()
        try:
            run_backend(label, args, rounds, url)
        finally:
            cleanup()
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work on the machine lowers msg/s)")


if __name__ == "__main__":
    main()
