#!/usr/bin/python3
"""bench/report.py RAW.tsv OUT.md OUT.png — table, chart and issue-5 targets from bench/run's raw
results (lines "config<TAB>metric<TAB>value"; several values of a metric = several runs)."""
import re
import statistics
import sys
from collections import OrderedDict, defaultdict

ORDER = ["direct", "ksocks-tcsplice", "ksocks-sockmap", "ksocks-sockmap-8m", "ksocks-splice", "ksocks-copy",
         "ref-sockmap", "ref-splice", "ref-copy", "redsocks", "ss-libev",
         "ss-rust", "ksocks-ss", "socat", "udp-direct", "udp-ksocks", "udp-ss-rust"]
UDP = ["udp-direct", "udp-ksocks", "udp-ss-rust"]
KSOCKS = ["ksocks-tcsplice", "ksocks-sockmap", "ksocks-sockmap-8m", "ksocks-splice", "ksocks-copy"]
PEERS = ["redsocks", "ss-libev", "ss-rust", "socat"]
LABEL = {
    "direct": "direct (kernel forwarding)",
    "ksocks-tcsplice": "ksocks --dataplane tcsplice",
    "ksocks-sockmap": "ksocks --dataplane sockmap",
    "ksocks-sockmap-8m": "ksocks --dataplane sockmap --sndbuf 8388608",
    "ksocks-splice": "ksocks --dataplane splice",
    "ksocks-copy": "ksocks --dataplane copy",
    "ref-sockmap": "KSOCKS_REF (another build) --dataplane sockmap",
    "ref-splice": "KSOCKS_REF (another build) --dataplane splice",
    "ref-copy": "KSOCKS_REF (another build) --dataplane copy",
    "redsocks": "redsocks + microsocks",
    "ss-libev": "ss-redir + ss-server (libev)",
    "ss-rust": "sslocal redir + ssserver -m none",
    "ksocks-ss": "ksocks --upstream ss://none",
    "socat": "socat relay",
    "udp-direct": "UDP, direct (kernel forwarding)",
    "udp-ksocks": "ksocks --udp-tproxy (direct upstream)",
    "udp-ss-rust": "sslocal redir --udp-redir tproxy + ssserver -m none -U",
}
# metric -> (higher is better?)
BETTER_HIGH = {"tput1": True, "tput8": True, "lat_avg": False, "lat_p99": False, "cps": True,
               "proxy_cpu_gb": False, "sys_cpu_gb": False, "bench_cpu_gb": False, "rss_idle": False, "rss_1k": False,
               "rss_10k": False, "bin_size": False, "stall_kib": False}
RUN_METRICS = {"tput1", "tput8", "lat_avg", "lat_p99", "cps", "proxy_cpu_gb", "sys_cpu_gb", "bench_cpu_gb"}
NAMES = {"tput1": "1-stream throughput", "tput8": "8-stream throughput", "lat_avg": "RTT avg",
         "lat_p99": "RTT p99", "cps": "connections/s", "proxy_cpu_gb": "proxy CPU/GB",
         "sys_cpu_gb": "system CPU/GB", "bench_cpu_gb": "bench CPU/GB", "rss_idle": "RSS idle", "rss_1k": "RSS 1k conns",
         "rss_10k": "RSS 10k conns", "bin_size": "binary size",
         "stall_kib": "router KiB per stalled download"}


def load(path):
    vals = defaultdict(lambda: defaultdict(list))
    meta = OrderedDict()
    notes = defaultdict(list)
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) != 3:
                continue
            c, m, v = parts
            if c == "_meta":
                meta[m] = v
            elif m == "note":
                if v not in notes[c]:
                    notes[c].append(v)
            else:
                vals[c][m].append(v)
    return vals, meta, notes


def med(vals, c, m):
    xs = []
    for v in vals.get(c, {}).get(m, []):
        try:
            xs.append(float(v))
        except ValueError:
            pass
    return statistics.median(xs) if xs else None


def spread(vals, c, m):
    """(min, max) of a metric's runs, or None with fewer than two."""
    xs = []
    for v in vals.get(c, {}).get(m, []):
        try:
            xs.append(float(v))
        except ValueError:
            pass
    return (min(xs), max(xs)) if len(xs) > 1 else None


def text(vals, c, m):
    v = vals.get(c, {}).get(m, [])
    return v[0] if v else None


def fmt(x, digits=2):
    if x is None:
        return "—"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}"


def main():
    raw, out_md, out_png = sys.argv[1:4]
    vals, meta, notes = load(raw)
    configs = [c for c in ORDER if c in vals or c in notes]
    measured = [c for c in configs if any(m in vals.get(c, {}) for m in ("tput1", "lat_avg", "cps"))]
    udp_measured = [c for c in configs if c in UDP and "udp_tput" in vals.get(c, {})]
    M = {c: {m: med(vals, c, m) for m in BETTER_HIGH} for c in configs}
    for c in configs:  # RSS in MiB
        for m in ("rss_idle", "rss_1k", "rss_10k"):
            if M[c][m] is not None:
                M[c][m] /= 1024.0
    d = M.get("direct", {})

    def ratio(c, m):
        a, b = M[c].get(m), d.get(m)
        if a is None or not b:
            return None
        return a / b

    want_runs = int(meta.get("runs", "1") or 1)

    def cell(c, m, with_ratio=True, digits=2):
        a = M[c].get(m)
        if a is None:
            return "—"
        s = fmt(a, digits)
        mm = spread(vals, c, m) if m in RUN_METRICS else None
        if mm is not None:
            lo, hi = (x / 1024.0 if m.startswith("rss") else x for x in mm)
            s += f" [{fmt(lo, digits)}–{fmt(hi, digits)}]"
        got = len(vals.get(c, {}).get(m, []))
        if m in RUN_METRICS and got < want_runs:
            s += f" †{got}/{want_runs}"
        r = ratio(c, m) if with_ratio and c != "direct" else None
        if r is not None:
            s += f" ({r:.2f}×)"
        return s

    def per_conn(c):  # marginal KiB per idle connection between the two steps
        r1, r2 = M[c].get("rss_1k"), M[c].get("rss_10k")
        h1, h2 = med(vals, c, "held_1k"), med(vals, c, "held_10k")
        if None in (r1, r2, h1, h2) or h2 <= h1:
            return None
        return (r2 - r1) * 1024.0 / (h2 - h1)

    def rss10k_est(c):  # measured, or extrapolated to 10,000 when the fd limit held fewer
        r2, h2 = M[c].get("rss_10k"), med(vals, c, "held_10k")
        if r2 is None or h2 is None:
            return None, False
        if h2 >= 10000:
            return r2, False
        k = per_conn(c)
        if k is None or h2 < 9000:
            return None, False
        return r2 + k * (10000 - h2) / 1024.0, True

    def rss_cell(c, m):
        s = cell(c, m, with_ratio=False)
        held = med(vals, c, "held_" + m.split("_")[1]) if m != "rss_idle" else None
        want = {"rss_1k": 1000, "rss_10k": 10000}.get(m)
        if held is not None and want and held < want:
            s += f" [{held:,.0f} held]"
        return s

    lines = []
    runs = meta.get("runs", "?")
    lines.append(f"# ksocks benchmark — {meta.get('date', '?')}, kernel {meta.get('kernel', '?')}")
    lines.append("")
    lines.append(f"Machine: {meta.get('cpus', '?')}; load average at start {meta.get('loadavg', '?')}; "
                 f"fd limit {meta.get('nofile', '?')}; TCP congestion control {meta.get('cc', '?')}. Medians of {runs} run(s) (taken in rounds: each round runs every configuration once); iperf3 {meta.get('duration', '?')} s "
                 f"per run, sockperf and wrk {meta.get('duration', '?')} s per run; [min–max] of the runs after each "
                 f"median. Topology: client -> router -> "
                 f"server network namespaces over veth; every proxy runs in the router, fed by nft REDIRECT.")
    try:
        la = float(meta.get("loadavg", "0").split()[0])
    except ValueError:
        la = 0.0
    if la > 1.5:
        lines.append("")
        lines.append(f"**Warning: the machine was busy (load average {la:.1f} at start, "
                     f"{meta.get('loadavg_end', '?').split()[0]} at the end) — other work competed for the 2 "
                     "cores, so throughput, latency and the /proc/stat column are noisy.**")
        lines.append("")
    if meta.get("tools"):
        lines.append(f"Tools: {meta['tools']}." + (f" shadowsocks-rust: {meta['ssrust']}." if meta.get("ssrust") else "")
                     + (f" ksocks: {meta['ksocks']}." if meta.get("ksocks") else ""))
    lines.append("")
    lines.append("Figures in parentheses are the ratio to `direct`. Latency is the full round trip of a "
                 "64-byte request/response (sockperf ping-pong `--full-rtt`). CPU is seconds of user+sys per GB "
                 "moved during the 1-stream iperf3 run: *proxy* = the proxy's own processes (all threads and "
                 "children; a cpuacct cgroup), *bench* = everything the benchmark runs (proxy, iperf3 both "
                 "ends, servers; cpuacct cgroup, which includes softirq work done in those tasks' context) plus "
                 "all kernel threads (ksoftirqd, the kworkers that run the sockmap psock backlog), "
                 "*system* = the whole machine from /proc/stat (user+system+irq+softirq; `nice` excluded) — "
                 "so kernel work is not hidden; *system* also counts whatever else the machine ran, "
                 "*bench* does not. "
                 "RSS in MiB (sum over the proxy's processes; socat: sum of Pss); KiB/conn is the growth per "
                 "idle connection between the two steps. [N held] marks a step that held fewer than asked: "
                 f"the fd limit here is {meta.get('nofile', '?')} (the hard limit cannot be raised without "
                 "CAP_SYS_RESOURCE) and a relay needs 2 descriptors per connection, so the large step asks "
                 f"for {meta.get('hold', '?').split(',')[-1]} connections. †k/n: only k of n runs succeeded "
                 "(median of those; see the notes).")
    lines.append("")
    if measured:
        hdr = ["configuration", "1 stream Gbit/s", "8 streams Gbit/s", "RTT avg µs", "RTT p99 µs",
               "conn/s", "proxy CPU s/GB", "bench CPU s/GB", "system CPU s/GB", "RSS idle", "RSS 1k conns", "RSS 10k conns",
               "KiB/conn", "stalled KiB/conn", "binary"]
        lines.append("| " + " | ".join(hdr) + " |")
        lines.append("|" + "---|" * len(hdr))
        for c in configs:
            if c not in measured:
                continue
            binsz = M[c].get("bin_size")
            row = [f"`{c}`", cell(c, "tput1"), cell(c, "tput8"), cell(c, "lat_avg", digits=1),
                   cell(c, "lat_p99", digits=1), cell(c, "cps"), cell(c, "proxy_cpu_gb", False, 3),
                   cell(c, "bench_cpu_gb", digits=3),
                   cell(c, "sys_cpu_gb", digits=3),
                   rss_cell(c, "rss_idle") if c != "direct" else "—",
                   rss_cell(c, "rss_1k") if c != "direct" else "—",
                   rss_cell(c, "rss_10k") if c != "direct" else "—",
                   fmt(per_conn(c), 1) if c != "direct" else "—",
                   fmt(M[c].get("stall_kib"), 1),
                   f"{binsz / 1024:,.0f} KiB" if binsz else "—"]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if udp_measured:
        lines.append(f"UDP: `iperf3 -u -b {meta.get('udp_rate', '?')} -l {meta.get('udp_len', '?')} -w 4M` (a fixed "
                     "offered rate) from the client to the server through each relay, fed by an nft TPROXY rule "
                     "for UDP; received Gbit/s (ratio to `udp-direct`), loss as iperf3's server counts it, CPU "
                     "per GB received as above, RSS in MiB after the runs.")
        lines.append("")
        uh = ["configuration", "offered Gbit/s", "received Gbit/s", "loss %", "proxy CPU s/GB",
              "bench CPU s/GB", "system CPU s/GB", "RSS idle", "RSS after"]
        lines.append("| " + " | ".join(uh) + " |")
        lines.append("|" + "---|" * len(uh))
        ud = med(vals, "udp-direct", "udp_tput")
        for c in udp_measured:
            t = med(vals, c, "udp_tput")
            tcell = fmt(t) + (f" ({t / ud:.2f}×)" if ud and c != "udp-direct" and t is not None else "")
            mib = lambda m: fmt(med(vals, c, m) / 1024.0) if med(vals, c, m) is not None else "—"
            row = [f"`{c}`", fmt(med(vals, c, "udp_sent")), tcell, fmt(med(vals, c, "udp_loss"), 3),
                   fmt(med(vals, c, "udp_proxy_cpu_gb"), 3), fmt(med(vals, c, "udp_bench_cpu_gb"), 3),
                   fmt(med(vals, c, "udp_sys_cpu_gb"), 3), mib("rss_idle"), mib("udp_rss")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines.append("Configurations:")
    for c in configs:
        extra = []
        if text(vals, c, "plane"):
            extra.append(f"plane/cipher: {text(vals, c, 'plane')}")
        b, p, k = M[c].get("bench_cpu_gb"), M[c].get("proxy_cpu_gb"), med(vals, c, "kthread_cpu_gb")
        if b is not None and p is not None and k is not None:
            extra.append(f"bench CPU/GB = proxy {p:.3f} + kernel threads {k:.3f} + iperf3 ends and "
                         f"servers {b - p - k:.3f} s")
        if text(vals, c, "bin_desc"):
            extra.append(f"executables: {text(vals, c, 'bin_desc')}")
        grouped = OrderedDict()  # "iperf3 -P 1 run 2 failed: X" x3 -> "... failed (3 runs): X"
        for n in notes.get(c, []):
            key = re.sub(r" run \d+", "", n)
            grouped[key] = grouped.get(key, 0) + 1
        for n, k in grouped.items():
            extra.append(n + (f" ({k} runs)" if k > 1 else ""))
        lines.append(f"- `{c}` — {LABEL.get(c, c)}" + ("; " + "; ".join(extra) if extra else ""))
    lines.append("")

    # ------------------------------------------------------------ targets
    T = []

    def best(cands, m):
        xs = [(M[c][m], c) for c in cands if c in M and M[c].get(m) is not None]
        if not xs:
            return None, None
        return (max if BETTER_HIGH[m] else min)(xs)

    bk, bkc = best(KSOCKS, "tput1")
    dt = d.get("tput1")
    if bk is None or not dt:
        T.append(("best ksocks plane 1-stream throughput >= 0.80 x direct", None, "not measured"))
    else:
        T.append(("best ksocks plane 1-stream throughput >= 0.80 x direct", bk >= 0.8 * dt,
                  f"{bkc} {bk:.2f} Gbit/s = {bk / dt:.2f} x direct {dt:.2f}"))
    sm, sp = M.get("ksocks-sockmap", {}), M.get("ksocks-splice", {})
    # Both sockmap rows count: the default, and --sndbuf 8 MiB (more memory per slow reader).
    for name in ("ksocks-sockmap", "ksocks-sockmap-8m"):
        v = M.get(name, {})
        if v.get("tput1") is None or sp.get("tput1") is None:
            T.append((f"{name} bulk throughput >= ksocks-splice", None, "not measured"))
            continue
        ok = v["tput1"] >= sp["tput1"] and (v.get("tput8") or 0) >= (sp.get("tput8") or 0)
        T.append((f"{name} bulk throughput >= ksocks-splice", ok,
                  f"1 stream {v['tput1']:.2f} vs {sp['tput1']:.2f}; 8 streams {fmt(v.get('tput8'))} vs {fmt(sp.get('tput8'))} Gbit/s"))
    if sm.get("lat_avg") is None or not d.get("lat_avg"):
        T.append(("ksocks-sockmap RTT within 10% of direct", None, "not measured"))
    else:
        T.append(("ksocks-sockmap RTT within 10% of direct", sm["lat_avg"] <= 1.10 * d["lat_avg"],
                  f"{sm['lat_avg']:.1f} vs {d['lat_avg']:.1f} µs = {sm['lat_avg'] / d['lat_avg']:.2f} x"))
    if sm.get("proxy_cpu_gb") is None:
        T.append(("ksocks-sockmap proxy-process CPU <= 0.01 s/GB", None, "not measured"))
    else:
        T.append(("ksocks-sockmap proxy-process CPU <= 0.01 s/GB", sm["proxy_cpu_gb"] <= 0.01,
                  f"{sm['proxy_cpu_gb']:.4f} s/GB"))
    cp = M.get("ksocks-copy", {})
    peers = [c for c in PEERS if c in measured]
    if not cp or cp.get("tput1") is None or not peers:
        T.append(("ksocks-copy not worse than the best userspace peer on any metric", None, "not measured"))
    else:
        worse = []
        for m, hi in BETTER_HIGH.items():
            if m == "sys_cpu_gb" and cp.get("bench_cpu_gb") is not None:
                continue  # /proc/stat also counts other work on the machine: use bench CPU
            b, bc = best(peers, m)
            a = cp.get(m)
            if a is None or b is None:
                continue
            if (a < b) if hi else (a > b):
                worse.append(f"{NAMES[m]} {fmt(a)} vs {bc} {fmt(b)}")
        T.append(("ksocks-copy not worse than the best userspace peer on any metric", not worse,
                  "worse on: " + "; ".join(worse) if worse else f"peers compared: {', '.join(peers)}"))
    ks_idle = [(M[c]["rss_idle"], c) for c in KSOCKS if c in measured and M[c].get("rss_idle") is not None]
    if not ks_idle:
        T.append(("ksocks RSS <= 1 MiB idle", None, "not measured"))
    else:
        worst = max(ks_idle)
        T.append(("ksocks RSS <= 1 MiB idle", worst[0] <= 1.0,
                  ", ".join(f"{c} {v:.2f} MiB" for v, c in ks_idle)))
    r10, extrap = rss10k_est("ksocks-splice") if "ksocks-splice" in M else (None, False)
    if r10 is None:
        T.append(("ksocks RSS <= 3 MiB with 10,000 spliced connections", None, "not measured"))
    else:
        held = med(vals, "ksocks-splice", "held_10k")
        T.append(("ksocks RSS <= 3 MiB with 10,000 spliced connections", r10 <= 3.0,
                  f"{r10:.2f} MiB" + (f" (extrapolated from {M['ksocks-splice']['rss_10k']:.2f} MiB with "
                                      f"{held:,.0f} held, {per_conn('ksocks-splice'):.2f} KiB/conn)" if extrap
                                      else f" with {held:,.0f} connections held")))
    kc, kcc = best(KSOCKS, "cps")
    pc, pcc = best(peers, "cps")
    if kc is None or pc is None:
        T.append(("ksocks connection rate >= the best peer", None, "not measured"))
    else:
        T.append(("ksocks connection rate >= the best peer", kc >= pc,
                  f"{kcc} {kc:,.0f}/s vs {pcc} {pc:,.0f}/s"))

    # Issue 10: tcsplice against kernel forwarding.
    tc = M.get("ksocks-tcsplice", {})
    T10 = []
    for m, want, what in (("tput1", 0.90, "single stream"), ("tput8", 0.90, "8 streams")):
        if tc.get(m) is None or not d.get(m):
            T10.append((f"ksocks-tcsplice {what} >= {want:.2f} x direct", None, "not measured"))
        else:
            T10.append((f"ksocks-tcsplice {what} >= {want:.2f} x direct", tc[m] >= want * d[m],
                        f"{tc[m]:.2f} vs {d[m]:.2f} Gbit/s = {tc[m] / d[m]:.2f} x"))
    if tc.get("lat_avg") is None or not d.get("lat_avg"):
        T10.append(("ksocks-tcsplice 64-byte RTT within 10% of direct", None, "not measured"))
    else:
        T10.append(("ksocks-tcsplice 64-byte RTT within 10% of direct", tc["lat_avg"] <= 1.10 * d["lat_avg"],
                    f"{tc['lat_avg']:.1f} vs {d['lat_avg']:.1f} µs = {tc['lat_avg'] / d['lat_avg']:.2f} x"))
    if tc.get("proxy_cpu_gb") is None:
        T10.append(("ksocks-tcsplice proxy CPU <= 0.01 s/GB", None, "not measured"))
    else:
        T10.append(("ksocks-tcsplice proxy CPU <= 0.01 s/GB", tc["proxy_cpu_gb"] <= 0.01,
                    f"{tc['proxy_cpu_gb']:.4f} s/GB"))
    if tc.get("stall_kib") is None:
        T10.append(("ksocks-tcsplice router memory per stalled bulk connection about 0", None, "not measured"))
    else:
        others = ", ".join(f"{c} {M[c]['stall_kib']:.0f}" for c in KSOCKS
                           if c != "ksocks-tcsplice" and M.get(c, {}).get("stall_kib") is not None)
        T10.append(("ksocks-tcsplice router memory per stalled bulk connection about 0",
                    tc["stall_kib"] <= 16, f"{tc['stall_kib']:.1f} KiB" + (f" (KiB: {others})" if others else "")))
    lines.append("## Issue 10 targets (tcsplice)")
    lines.append("")
    for name, ok, why in T10:
        verdict = "not measured" if ok is None else ("met" if ok else "not met")
        lines.append(f"- {name}: **{verdict}** — {why}")
    lines.append("")
    lines.append("## Issue 5 targets")
    lines.append("")
    for name, ok, why in T:
        verdict = "not measured" if ok is None else ("met" if ok else "not met")
        lines.append(f"- {name}: **{verdict}** — {why}")
    lines.append("")
    if meta.get("elapsed"):
        lines.append(f"Run time {int(meta['elapsed']) // 60} min {int(meta['elapsed']) % 60} s.")
        lines.append("")
    md = "\n".join(lines)
    with open(out_md, "w") as f:
        f.write(md)
    print(md)

    # ------------------------------------------------------------ chart
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"bench/report.py: no chart ({e})", file=sys.stderr)
        return
    cs = [c for c in measured if c != "direct"]
    if not cs or not d:
        return
    groups = [("higher is better", ["tput1", "tput8", "cps"]),
              ("lower is better", ["lat_avg", "lat_p99",
                                   "bench_cpu_gb" if d.get("bench_cpu_gb") else "sys_cpu_gb"])]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.3 * len(cs) + 3), 8))
    for ax, (title, ms) in zip(axes, groups):
        w = 0.8 / len(ms)
        for i, m in enumerate(ms):
            ys = [ratio(c, m) or 0 for c in cs]
            xs = [j + (i - (len(ms) - 1) / 2) * w for j in range(len(cs))]
            bars = ax.bar(xs, ys, w, label=NAMES[m])
            for x, y in zip(xs, ys):
                if y:
                    ax.text(x, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        if title.startswith("lower"):
            ax.set_yscale("log")
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels(cs, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("ratio to direct")
        ax.set_title(f"ratio to direct kernel forwarding — {title}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"ksocks bench {meta.get('date', '')} kernel {meta.get('kernel', '')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


if __name__ == "__main__":
    main()
