"""Load times of the embedded default model: cold (GGUF dequantization + tokenizer conversion into an empty
cache) and warm (from the cache), each in a fresh process. Prints a markdown table.

    python benchmarks/bench_load.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import time
t = time.perf_counter()
import jaxedit
t_import = time.perf_counter() - t
t = time.perf_counter()
model, tok = jaxedit.load("smollm2")
print(t_import, time.perf_counter() - t)
"""


def run(cache):
    env = dict(os.environ, JAXEDIT_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    t_import, t_load = map(float, out.stdout.split()[-2:])
    return t_import, t_load


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        rows = [("cold (empty cache)",) + run(cache)]
        rows += [(f"warm #{i + 1}",) + run(cache) for i in range(args.repeat)]
    print("| load of smollm2 | import jaxedit (s) | jaxedit.load (s) |")
    print("|---|---|---|")
    for name, ti, tl in rows:
        print(f"| {name} | {ti:.2f} | {tl:.2f} |")


if __name__ == "__main__":
    main()
