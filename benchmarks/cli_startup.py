"""Start-up cost of the `jaguar` command as a user sees it: the whole process (interpreter start,
imports, parsing, printing), wall time and peak RSS, for `--help`, `--version` and each
`jaguar CMD --help`, several runs each, plus which heavy packages each process imported.

    python benchmarks/cli_startup.py --repeats 5
    python benchmarks/cli_startup.py --repeats 3 --entry jaguar.cli.main   # the module every version has

Each run is a fresh `python -m ENTRY ARGS` process; its peak RSS comes from wait4's rusage, so
it is that process alone. Prints the median and the min-max of each, and the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "torchvision", "timm", "numpy", "safetensors", "PIL", "accelerate")
# Printed after the command's own output so the heavy-module check rides along in the same process.
PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: sys.stderr.write('\\nHEAVY=' + ','.join("
         f"m for m in {HEAVY!r} if m in sys.modules) + '\\n'))\n")


def commands(entry: str) -> list[list[str]]:
    """`--help`, `--version` (when the entry knows it) and every sub-command's `--help`."""
    listing = subprocess.run([sys.executable, "-c", "from jaguar.cli.main import build_parser; import argparse;"
                              "p = build_parser(); s = next(a for a in p._actions "
                              "if isinstance(a, argparse._SubParsersAction)); print(' '.join(s.choices))"],
                             capture_output=True, text=True, check=True)
    runs = [["--help"], ["--version"]] + [[name, "--help"] for name in listing.stdout.split()]
    return runs


def one_run(entry: str, args: list[str]) -> tuple[float, float, str, int, float]:
    """(wall s, peak RSS MB, heavy modules imported, exit status, CPU s) of one fresh process. CPU
    time (user + system) depends far less than wall time on other jobs sharing the machine."""
    code = PROBE + f"import runpy, sys; sys.argv = ['jaguar', *{args!r}]; runpy.run_module({entry!r}, run_name='__main__')"
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    heavy = next((line[6:] for line in stderr.splitlines() if line.startswith("HEAVY=")), "?")
    return wall, usage.ru_maxrss / 1024, heavy or "-", process.returncode, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per command (default 5)")
    parser.add_argument("--entry", default="jaguar", help="module run with -m (default jaguar; jaguar.cli.main for "
                                                          "versions without jaguar/__main__.py)")
    parser.add_argument("--only", nargs="*", default=None, help="only these sub-commands (default all)")
    options = parser.parse_args()
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}; "
          f"entry python -m {options.entry}, {options.repeats} runs each")
    print(f"{'command':<28} {'wall s median (min-max)':>26} {'CPU s median':>13} {'peak RSS MB median (min-max)':>30}  "
          "exit  heavy imports")
    for args in commands(options.entry):
        if options.only is not None and args[0] not in options.only and args[0].startswith("-") is False:
            continue
        runs = [one_run(options.entry, args) for _ in range(options.repeats)]
        walls, rss = [r[0] for r in runs], [r[1] for r in runs]
        print(f"{'jaguar ' + ' '.join(args):<28} {statistics.median(walls):9.2f} ({min(walls):.2f}-{max(walls):.2f})"
              f"{'':>6} {statistics.median(r[4] for r in runs):13.2f} {statistics.median(rss):11.0f} ({min(rss):.0f}-{max(rss):.0f}){'':>9}  {runs[-1][3]:>4}  "
              f"{runs[-1][2]}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
