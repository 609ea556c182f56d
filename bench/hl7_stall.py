"""How long one hostile HL7 sender can stall the other doors.

    .venv/bin/python bench/hl7_stall.py [--reps 20000] [--trickle 300]

Starts `clinphoto serve` (HTTP + MLLP) on an empty SQLite store in a temporary folder and runs two attacks:

1. *big message*: one ADT whose PID-3 holds --reps repetitions (20,000 is ~300 KB). While the gateway
   reads it, /healthz is polled and a normal A01 is sent on a second connection; the worst /healthz
   latency, the normal ACK's latency and how the big message was answered are printed.
2. *trickle*: --trickle connections each sending one byte of an unfinished frame every 2 s, for --seconds
   seconds; meanwhile the worst /healthz and normal-ADT latencies, how many trickling connections are
   still open at the end, and how many log lines the gateway wrote are printed.

Anchors in the same run: the /healthz and normal-ADT latencies before any attack starts.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.hl7.mllp import MllpDecoder, frame  # noqa: E402

NORMAL = ("MSH|^~\\&|PAS|RX1|CLINPHOTO|RX1|20240301100000||ADT^A01^ADT_A01|{cid}|P|2.4\r"
          "EVN|A01|20240301100000\r"
          "PID|1||9990000018^^^NHS^NH~M{cid}^^^RX1^MR||TEST^PAT||19800101|F\r"
          "PV1|1|I|WARD1^B^1^RX1||||C1^DOC^ONE|||330||||19|||||V{cid}\r")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, timeout: float = 60.0) -> float:
    """Seconds for GET /healthz on a fresh connection (what a load balancer's probe sees)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
    return time.monotonic() - start


def send_adt(port: int, message: str, timeout: float = 600.0) -> tuple[float, bytes]:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(frame(message.encode()))
        decoder = MllpDecoder()
        while True:
            data = s.recv(65536)
            if not data:
                return time.monotonic() - start, b"(connection closed without an ACK)"
            acks, _, _ = decoder.feed(data)
            if acks:
                return time.monotonic() - start, acks[0]


def msa(ack: bytes) -> str:
    for seg in ack.split(b"\r"):
        if seg.startswith(b"MSA"):
            return seg.decode(errors="replace")[:60]
    return ack.decode(errors="replace")[:60]


def big_message(reps: int) -> str:
    ids = "~".join(f"X{i}^^^RX1^MR" for i in range(reps))
    return NORMAL.format(cid="BIG").replace("9990000018^^^NHS^NH~MBIG^^^RX1^MR", ids)


def probe_while(busy: threading.Event, http_port: int) -> list[float]:
    worst: list[float] = []
    while busy.is_set():
        worst.append(http_get(http_port))
        time.sleep(0.05)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--trickle", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fd-limit", type=int, default=256,
                    help="the gateway's open-file limit (RLIMIT_NOFILE), so the flood meets it as on a small host")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = os.environ.get("STALL_KEEP_DIR", tmp)
        http_port, mllp_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLINPHOTO_")}
        env.update(CLINPHOTO_DATA_DIR=tmp, CLINPHOTO_HTTP_PORT=str(http_port), CLINPHOTO_MLLP_PORT=str(mllp_port),
                   CLINPHOTO_LISTENERS='["http","mllp"]', CLINPHOTO_LOG_LEVEL="INFO")
        log_path = Path(tmp) / "gateway.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve"], env=env, cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (args.fd_limit, args.fd_limit)))
        try:
            for _ in range(200):
                try:
                    http_get(http_port, 1)
                    break
                except OSError:
                    time.sleep(0.1)
            anchor_http = min(http_get(http_port) for _ in range(5))
            anchor_adt = min(send_adt(mllp_port, NORMAL.format(cid=f"A{i}"))[0] for i in range(5))
            print(f"anchor: /healthz {anchor_http * 1000:.1f} ms, normal ADT ACK {anchor_adt * 1000:.1f} ms")

            # 1. one message with a huge PID-3
            busy = threading.Event()
            busy.set()
            probes: list[float] = []
            prober = threading.Thread(target=lambda: probes.extend(probe_while(busy, http_port)))
            result: dict = {}

            def big() -> None:
                result["big"] = send_adt(mllp_port, big_message(args.reps))
                busy.clear()

            sender = threading.Thread(target=big)
            sender.start()
            time.sleep(0.2)
            prober.start()
            normal_latency, normal_ack = send_adt(mllp_port, NORMAL.format(cid="DURING"))
            sender.join()
            prober.join()
            big_latency, big_ack = result["big"]
            print(f"big message ({args.reps} PID-3 repetitions, {len(big_message(args.reps)) // 1024} KB): answered in "
                  f"{big_latency:.2f} s with {msa(big_ack)!r}")
            print(f"  meanwhile: worst /healthz {max(probes or [0]) * 1000:.0f} ms over {len(probes)} probes; "
                  f"normal ADT on another connection {normal_latency * 1000:.0f} ms ({msa(normal_ack)!r})")

            # 2. slow senders
            lines_before = log_path.read_bytes().count(b"\n")
            socks: list[socket.socket] = []
            refused = 0
            for _ in range(args.trickle):
                try:
                    s = socket.create_connection(("127.0.0.1", mllp_port), timeout=5)
                    s.sendall(b"\x0bMSH|")
                    socks.append(s)
                except OSError:
                    refused += 1
            deadline = time.monotonic() + args.seconds
            worst_http = worst_adt = 0.0
            n = answered = refused_adt = 0
            while time.monotonic() < deadline:
                for s in socks:
                    try:
                        s.send(b"^")
                    except OSError:
                        pass
                try:
                    worst_http = max(worst_http, http_get(http_port, timeout=10))
                except OSError:
                    worst_http = float("inf")  # no answer within 10 s
                try:
                    latency, ack = send_adt(mllp_port, NORMAL.format(cid=f"T{n}"), timeout=30)
                    if b"MSA|AA" in ack:
                        worst_adt, answered = max(worst_adt, latency), answered + 1
                    else:
                        refused_adt += 1
                except OSError:
                    refused_adt += 1
                n += 1
                time.sleep(2)
            still_open = 0
            for s in socks:
                s.setblocking(False)
                try:
                    still_open += s.recv(1) != b""
                except BlockingIOError:
                    still_open += 1
                except OSError:
                    pass
                s.close()
            lines = log_path.read_bytes().count(b"\n") - lines_before
            print(f"trickle (gateway fd limit {args.fd_limit}): {args.trickle} connections ({refused} refused at connect) for {args.seconds:.0f} s: "
                  f"worst /healthz {worst_http * 1000:.0f} ms; normal ADT every 2 s: {answered} answered (worst "
                  f"{worst_adt * 1000:.0f} ms), {refused_adt} refused; "
                  f"{still_open} trickling connections still open at the end, {lines} log lines")
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
