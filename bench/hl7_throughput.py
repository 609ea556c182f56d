"""HL7 v2 ADT throughput over real MLLP sockets: msg/s and p50/p99 ACK latency, 1 and 8 connections.

    .venv/bin/python bench/hl7_throughput.py [-n 4000] [--connections 1,8]            # starts its own gateway
    .venv/bin/python bench/hl7_throughput.py --host 127.0.0.1 --port 2575 [-n 4000]    # against a running one

Without --port it starts `clinphoto serve` (MLLP only) on an empty SQLite store in
a temporary folder: synchronous=FULL, so every ACK follows a durable commit.
The messages are a mix of A01 (40%: new patient + encounter), A08 (30%:
update with encounter), A31 (20%: person update, half of them registering a
duplicate record under a second MRN) and A40 (10%: that duplicate merged into
an existing patient), with valid NHS numbers; every ACK is checked (AA).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.hl7.mllp import MllpDecoder, frame  # noqa: E402
from gateway.core.nhs import check_digit  # noqa: E402


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
               start: threading.Barrier) -> None:
    """One MLLP client, the way a PAS sends: one message, wait for its ACK, the next (blocking socket: the
    client's own overhead per round trip stays small)."""
    sock = socket.create_connection((host, port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    decoder = MllpDecoder()
    messages = [frame(synth.next()) for _ in range(count)]
    mine: list[float] = []
    start.wait()
    for data in messages:
        t0 = time.perf_counter()
        sock.sendall(data)
        acks: list[bytes] = []
        while not acks:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("gateway closed the connection")
            acks = decoder.feed(chunk)[0]
        mine.append(time.perf_counter() - t0)
        if b"\rMSA|AA|" not in acks[0]:
            bad.append(1)
            if len(bad) <= 3:
                print("  not AA:", acks[0].replace(b"\r", b" | ").decode(errors="replace")[:300], file=sys.stderr)
    sock.close()
    latencies.extend(mine)


def run_round(host: str, port: int, n: int, conns: int, run: str) -> dict:
    latencies: list[float] = []
    bad: list[int] = []
    per = n // conns
    start = threading.Barrier(conns + 1)
    threads = [threading.Thread(target=connection, args=(host, port, Synth(run, c), per, latencies, bad, start))
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
        "connections": conns, "messages": per * conns, "seconds": elapsed, "rate": per * conns / elapsed,
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
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"gateway exited with {proc.returncode}")
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("gateway did not start listening within 60 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=4000, help="messages per round")
    ap.add_argument("--connections", default="1,8", help="comma-separated connection counts, one round each")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, help="a running gateway's MLLP port; default: start one")
    ap.add_argument("--database-url", help="for the gateway this starts (default SQLite in a temp folder)")
    args = ap.parse_args()
    rounds = [int(c) for c in args.connections.split(",")]
    with tempfile.TemporaryDirectory(prefix="clinphoto-bench-") as tmp:
        proc = None
        port = args.port
        if port is None:
            proc, port = start_gateway(Path(tmp), args.database_url)
            print(f"gateway: clinphoto serve (MLLP only) on 127.0.0.1:{port}, "
                  f"{args.database_url.split('@')[-1] if args.database_url else 'SQLite synchronous=FULL'}")
        try:
            run = uuid.uuid4().hex[:6]
            run_round(args.host, port, min(200, args.messages), 1, run + "w")  # warm-up
            pid = proc.pid if proc is not None else None
            print(f"{'connections':>11} {'messages':>9} {'msg/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'not AA':>6}"
                  f" {'gateway CPU ms/msg':>19}")
            for i, conns in enumerate(rounds):
                cpu0 = cpu_seconds(pid)
                r = run_round(args.host, port, args.messages, conns, f"{run}{i}")
                cpu1 = cpu_seconds(pid)
                cpu = f"{(cpu1 - cpu0) * 1000 / r['messages']:.3f}" if cpu0 is not None and cpu1 is not None else "-"
                print(f"{r['connections']:>11} {r['messages']:>9} {r['rate']:>8.0f} {r['p50_ms']:>7.2f} "
                      f"{r['p99_ms']:>7.2f} {r['not_aa']:>6} {cpu:>19}")
            print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (other work on the machine lowers msg/s)")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)


if __name__ == "__main__":
    main()
