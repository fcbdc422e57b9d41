#!/usr/bin/python3
"""Small helpers for bench/run (stdlib only).

  tools.py cpu PID...            utime+stime of the processes (all threads), of their reaped
                                 children (cutime+cstime) and of live descendants, in seconds
  tools.py rss PID...            summed VmRSS of the processes and their live descendants, KiB
  tools.py pss PID...            summed Pss (smaps_rollup) of the same set, KiB
  tools.py nprocs PID...         number of processes in that set
  tools.py sysbusy               whole-system busy CPU seconds so far (/proc/stat: user+system+
                                 irq+softirq; `nice` is left out so niced background jobs of
                                 other users of the machine do not count)
  tools.py kthreads-snap FILE    save the CPU ns of every kernel thread (schedstat)
  tools.py kthreads-delta FILE   CPU seconds kernel threads used since the snapshot
  tools.py elf PATH              "dynamic" or "static" (PT_INTERP present or not)
  tools.py hold-server --ports A-B --status FILE [--max-time S]
  tools.py hold-client --dst IP --ports A-B --counts N1,N2 --status FILE [--max-time S]
      the client opens N1 connections, writes "opened=<ok> failed=<n>" to FILE, waits for
      SIGUSR1, opens up to N2, writes FILE again, then holds until SIGTERM or --max-time.
      The server accepts and holds; FILE holds the number of currently open connections.
  tools.py stall-server --port P [--max-time S]
  tools.py stall-client --dst IP --port P --count N --status FILE [--max-time S]
      stalled bulk downloads: the client opens N connections and sends one byte on each (a
      request), then never reads; the server answers each request after 0.3 s (a quiet moment,
      as after a real request) with data until the connection goes away. FILE: "opened=<n>".
"""
import threading
import os
import selectors
import signal
import socket
import struct
import sys
import time

CLK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode(errors="replace")
    # fields after the ")" of comm; index 0 is field 3 (state)
    return data[data.rindex(")") + 2:].split()


def _children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return out


def _descendants(pids):
    seen, todo = [], list(pids)
    while todo and len(seen) < 100000:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def cmd_cpu(pids):
    total = 0
    for p in pids:
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # utime stime cutime cstime = fields 14..17 -> index 11..14
        total += sum(int(x) for x in f[11:15])
    for p in _descendants(pids):
        if p in pids:
            continue
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15])
    print(f"{total / CLK:.3f}")


def _status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmd_rss(pids):
    print(sum(_status_kib(p, "VmRSS") for p in _descendants(pids)))


def cmd_pss(pids):
    total = 0
    for p in _descendants(pids):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    print(total)


def cmd_nprocs(pids):
    print(len([p for p in _descendants(pids) if os.path.exists(f"/proc/{p}")]))


def cmd_sysbusy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, _nice, system, _idle, _iowait, irq, softirq = v[:7]
    print(f"{(user + system + irq + softirq) / CLK:.3f}")


def _kthreads():
    """pid -> ns on CPU, for all kernel threads (children of kthreadd: ksoftirqd, the kworkers
    that run the sockmap psock backlog, ...), from /proc/PID/schedstat (exact)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = _stat_fields(d)
            if d != "2" and f[1] != "2":  # ppid
                continue
            with open(f"/proc/{d}/schedstat") as fh:
                out[d] = int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def cmd_kthreads_snap(path):
    with open(path, "w") as f:
        for k, v in _kthreads().items():
            f.write(f"{k} {v}\n")


def cmd_kthreads_delta(path):
    old = {}
    with open(path) as f:
        for line in f:
            k, v = line.split()
            old[k] = int(v)
    total = 0
    for k, v in _kthreads().items():
        o = old.get(k, 0)
        total += v - o if v >= o else v
    print(f"{total / 1e9:.4f}")


def cmd_elf(path):
    with open(path, "rb") as f:
        hdr = f.read(64)
        if hdr[:4] != b"\x7fELF":
            print("not-elf")
            return
        is64 = hdr[4] == 2
        end = "<" if hdr[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack(end + "Q", hdr[32:40])
            phentsize, phnum = struct.unpack(end + "HH", hdr[54:58])
        else:
            phoff, = struct.unpack(end + "I", hdr[28:32])
            phentsize, phnum = struct.unpack(end + "HH", hdr[42:46])
        f.seek(phoff)
        for _ in range(min(phnum, 256)):
            ph = f.read(phentsize)
            if struct.unpack(end + "I", ph[:4])[0] == 3:  # PT_INTERP
                print("dynamic")
                return
    print("static")


def _ports(spec):
    a, _, b = spec.partition("-")
    return list(range(int(a), int(b or a) + 1))


def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def _opt(args, name, default=None):
    if name in args:
        return args[args.index(name) + 1]
    if default is None:
        sys.exit(f"tools.py: missing {name}")
    return default


def cmd_hold_server(args):
    ports = _ports(_opt(args, "--ports"))
    status = _opt(args, "--status")
    deadline = time.monotonic() + float(_opt(args, "--max-time", "3600"))
    sel = selectors.DefaultSelector()
    for p in ports:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", p))
        ls.listen(4096)
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ, "listen")
    conns = 0
    last = None
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    while not stop and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            if key.data == "listen":
                for _ in range(1000):
                    try:
                        c, _a = s.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ, "conn")
                    conns += 1
            else:
                try:
                    d = s.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    d = b""
                if not d:
                    sel.unregister(s)
                    s.close()
                    conns -= 1
        if conns != last:
            _write(status, str(conns))
            last = conns


def cmd_hold_client(args):
    dst = _opt(args, "--dst")
    ports = _ports(_opt(args, "--ports"))
    counts = [int(x) for x in _opt(args, "--counts").split(",")]
    status = _opt(args, "--status")
    deadline = time.monotonic() + float(_opt(args, "--max-time", "300"))
    go = []
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: go.append(1))
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    socks, failed = [], 0
    for i, n in enumerate(counts):
        stage_deadline = min(deadline, time.monotonic() + 60)
        while len(socks) < n and not stop and time.monotonic() < stage_deadline:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(1.0)
            try:
                s.connect((dst, ports[(len(socks) + failed) % len(ports)]))
                socks.append(s)
            except OSError:
                s.close()
                failed += 1
                if failed > 2000:
                    break
        _write(status, f"stage={i} opened={len(socks)} failed={failed}")
        if i + 1 < len(counts):
            while not go and not stop and time.monotonic() < deadline:
                time.sleep(0.05)
            go.clear()
    while not stop and time.monotonic() < deadline:
        time.sleep(0.1)
    for s in socks:
        s.close()


def cmd_stall_server(args):
    port = int(_opt(args, "--port"))
    deadline = time.monotonic() + float(_opt(args, "--max-time", "3600"))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(128)
    ls.settimeout(0.5)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))

    def serve(c):
        chunk = b"x" * 65536
        try:
            c.settimeout(max(1.0, deadline - time.monotonic()))
            if c.recv(1):
                time.sleep(0.3)
                while time.monotonic() < deadline:
                    c.sendall(chunk)
        except OSError:
            pass
        c.close()

    while time.monotonic() < deadline:
        try:
            c, _a = ls.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def cmd_stall_client(args):
    dst, port = _opt(args, "--dst"), int(_opt(args, "--port"))
    n, status = int(_opt(args, "--count")), _opt(args, "--status")
    deadline = time.monotonic() + float(_opt(args, "--max-time", "60"))
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        s.settimeout(3.0)
        try:
            s.connect((dst, port))
            s.sendall(b"?")
            socks.append(s)
        except OSError:
            s.close()
    _write(status, f"opened={len(socks)}")
    while not stop and time.monotonic() < deadline:
        time.sleep(0.1)
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd in ("cpu", "rss", "pss", "nprocs"):
        pids = [int(a) for a in args if a.isdigit()]
        {"cpu": cmd_cpu, "rss": cmd_rss, "pss": cmd_pss, "nprocs": cmd_nprocs}[cmd](pids)
    elif cmd == "sysbusy":
        cmd_sysbusy()
    elif cmd == "kthreads-snap":
        cmd_kthreads_snap(args[0])
    elif cmd == "kthreads-delta":
        cmd_kthreads_delta(args[0])
    elif cmd == "elf":
        cmd_elf(args[0])
    elif cmd == "hold-server":
        cmd_hold_server(args)
    elif cmd == "hold-client":
        cmd_hold_client(args)
    elif cmd == "stall-server":
        cmd_stall_server(args)
    elif cmd == "stall-client":
        cmd_stall_client(args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
