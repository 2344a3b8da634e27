#!/usr/bin/env python3
"""Runs the test binaries of several build configurations from a pool of lanes.

Usage: run-test-binaries.py LANES NAME=LIST [NAME=LIST ...]

Each LIST file holds one "package-directory<TAB>executable" line per test binary (what
`cargo test --no-run --message-format=json` built). The suites spend most of their time
waiting on servers and ttls, not on the CPU, so LANES binaries run at once, the slowest
suites first so that none of them starts last and leaves the other lanes idle. Each binary
runs from its package's directory, as `cargo test` runs it, with its output captured; when
all are done, each configuration's output is printed whole, in build order, with how long
each binary took. The exit status is 1 if any binary failed, and the failed configurations
are named on the last line.
"""

import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# The suites that take longest (a minute or more in CI), started first. The durations this
# script prints show when the list needs updating.
SLOWEST_FIRST = [
    "redis_sentinel",
    "safety_fenced",
    "safety",
    "etcd_session",
    "cluster_process",
    "etcd",
    "redis",
    "faults",
]


def binary_name(executable):
    # target/debug/deps/redis_sentinel-0123abcd -> redis_sentinel
    return os.path.basename(executable).rsplit("-", 1)[0]


def rank(job):
    name = binary_name(job["exe"])
    if name in SLOWEST_FIRST:
        return SLOWEST_FIRST.index(name)
    return len(SLOWEST_FIRST)


def run(job, logs):
    log = os.path.join(logs, "%s-%d.log" % (job["config"], job["index"]))
    started = time.monotonic()
    with open(log, "wb") as out:
        try:
            status = subprocess.call([job["exe"]], cwd=job["dir"], stdout=out, stderr=subprocess.STDOUT)
        except OSError as error:
            out.write(("could not run %s: %s\n" % (job["exe"], error)).encode())
            status = 127
    job["took"] = time.monotonic() - started
    job["status"] = status
    job["log"] = log
    with print_lock:
        verdict = "ok" if status == 0 else "FAILED (exit %d)" % status
        print("     %s %s: %s in %.0f s" % (job["config"], binary_name(job["exe"]), verdict, job["took"]), flush=True)


print_lock = threading.Lock()


def main():
    lanes = int(sys.argv[1])
    configs = []
    jobs = []
    for arg in sys.argv[2:]:
        config, path = arg.split("=", 1)
        configs.append(config)
        with open(path) as listing:
            for index, line in enumerate(listing):
                directory, exe = line.rstrip("\n").split("\t")
                jobs.append({"config": config, "index": index, "dir": directory, "exe": exe})
    # Stable sort: within a rank the configurations alternate as built.
    order = sorted(jobs, key=lambda job: (rank(job), job["index"], configs.index(job["config"])))
    with tempfile.TemporaryDirectory() as logs:
        with ThreadPoolExecutor(max_workers=lanes) as pool:
            for job in order:
                pool.submit(run, job, logs)
        failed = []
        for config in configs:
            print("\n==> tests with %s" % config, flush=True)
            for job in (job for job in jobs if job["config"] == config):
                print("     Running %s (took %.0f s)" % (job["exe"], job["took"]), flush=True)
                with open(job["log"], "rb") as log:
                    sys.stdout.buffer.write(log.read())
                sys.stdout.flush()
                if job["status"] != 0 and config not in failed:
                    failed.append(config)
    if failed:
        print("\n==> tests FAILED with: %s (see above)" % ", ".join(failed), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
