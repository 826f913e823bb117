#!/usr/bin/env python3
"""perf profile of one mkts binary during 100 full fetches of a symbol-year (benches/README.md, Zero-copy DoGet).

    python benches/doget_profile.py <mkts binary> <perf.data out>
"""
import sys, time, json, subprocess
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import doget_fetch_bench as b
import pyarrow.flight as fl
t = b.Mkts("p", sys.argv[1]); t.load(b.bars(525600))
print(t.proc.pid, flush=True)
c = fl.FlightClient(t.url); c.do_get(t.ticket).read_all()
p = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-g", "-o", sys.argv[2], "-p", str(t.proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(1)
for _ in range(100): c.do_get(t.ticket).read_all()
p.send_signal(2); p.wait(); t.stop()
