"""Prints, after an ops benchmark run, each implementation's speed-up over the eager reference."""


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    rows = [b for b in getattr(session, "benchmarks", []) if b.extra_info.get("op") and b.stats]
    if not rows:
        return
    base = {b.group: b.stats.median for b in rows if b.extra_info["implementation"] == "reference"}
    tr = terminalreporter
    tr.section("ops: median time and speed-up over the eager reference")
    tr.write_line(f"{'group':<42} {'implementation':<20} {'median us':>10} {'speed-up':>9}")
    for b in sorted(rows, key=lambda b: (b.group, b.stats.median)):
        ref = base.get(b.group)
        ratio = f"{ref / b.stats.median:8.2f}x" if ref else "       -"
        tr.write_line(f"{b.group:<42} {b.extra_info['implementation']:<20} {b.stats.median * 1e6:10.1f} {ratio}")
