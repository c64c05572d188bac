#!/usr/bin/env python3
"""Draws requests per second against payload size, one line per receiver, as an SVG (no
plotting library needed). Reads the TSV written by bench/run.sh: size, name, rps.

usage: plot.py RESULTS.tsv OUT.svg
"""
import math
import sys
from collections import defaultdict

from sizes import human

rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
series = defaultdict(list)
for size, name, rps in rows:
    if float(rps) > 0:
        series[name].append((int(size), float(rps)))

W, H, L, R, T, B = 760, 440, 70, 170, 30, 50
sizes = sorted({s for pts in series.values() for s, _ in pts})
rates = [r for pts in series.values() for _, r in pts]
x0, x1 = math.log10(min(sizes)), math.log10(max(sizes))
y0, y1 = math.floor(math.log10(min(rates))), math.ceil(math.log10(max(rates)))
x1 = x1 if x1 > x0 else x0 + 1


def px(size):
    return L + (math.log10(size) - x0) / (x1 - x0) * (W - L - R)


def py(rate):
    return T + (1 - (math.log10(rate) - y0) / (y1 - y0)) * (H - T - B)


colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{L}" y="18" font-size="14">Requests per second against payload size (log-log), one run</text>']
for e in range(int(y0), int(y1) + 1):
    y = py(10 ** e)
    out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{W - R}" y2="{y:.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{L - 8}" y="{y + 4:.1f}" text-anchor="end">{10 ** e:,}</text>')
for s in sizes:
    x = px(s)
    out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="#eee"/>')
    out.append(f'<text x="{x:.1f}" y="{H - B + 18}" text-anchor="middle">{human(s)}</text>')
out.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">payload size</text>')
for i, (name, pts) in enumerate(sorted(series.items())):
    color = colors[i % len(colors)]
    pts.sort()
    path = " ".join(f"{px(s):.1f},{py(r):.1f}" for s, r in pts)
    out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
    for s, r in pts:
        out.append(f'<circle cx="{px(s):.1f}" cy="{py(r):.1f}" r="3" fill="{color}"/>')
    ly = T + 20 + i * 20
    out.append(f'<line x1="{W - R + 15}" y1="{ly}" x2="{W - R + 35}" y2="{ly}" stroke="{color}" stroke-width="2"/>')
    out.append(f'<text x="{W - R + 40}" y="{ly + 4}">{name}</text>')
out.append("</svg>")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
