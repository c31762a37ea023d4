"""Runs tests/torchrun_worker.py under torchrun (2 gloo ranks on this host) N times in a row and
counts the runs that do not exit 0: the check of issue 22's exit abort ("terminate called without
an active exception" after destroy_process_group()).

    python tests/torchrun_loop.py [--runs 20] [--layer sync|plain|bn]

Prints one line per run and, for a failed run, the tail of its output; exits 1 if any failed.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--layer", choices=("sync", "plain", "bn"), default="sync")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per run")
    args = parser.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    failed = 0
    t0 = time.time()
    for run in range(args.runs):
        # --standalone: a rendezvous on a free local port, so parallel loops do not collide.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", os.path.join(HERE, "torchrun_worker.py"), "--layer", args.layer]
        start = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=args.timeout)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as error:
            code, output = "timeout", str(error.stdout or "") + str(error.stderr or "")
        aborted = "terminate called" in output
        print(f"run {run + 1}/{args.runs}: exit {code} in {time.time() - start:.1f} s"
              + (" (terminate called)" if aborted else ""), flush=True)
        if code != 0:
            failed += 1
            print("    " + "\n    ".join(output.strip().splitlines()[-15:]), flush=True)
    print(f"torchrun_loop: {args.runs - failed} of {args.runs} runs exited 0 "
          f"({args.layer}, {time.time() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
