"""Check an AVSBench layout before a run: every missing, unreadable or truncated file, at once.

What this file teaches
    The command line of data.check_dataset, the check train.py runs before it trains on a real
    dataset. data.py (its section 7) holds what a complete S4, MS3 or AVSS release looks like on
    disk, file by file, and which flaws the official AVSBench code reads anyway (audio slightly
    short of its clip, label colours outside the palette): those are listed as tolerated, with the
    file, and do not stop a run.

Usage
    python tools/check_dataset.py --dataset avss --data-root DIR [--deep]
    Exit code 2 when anything is wrong, 0 when only tolerated flaws are found.

Reading order: main(), then data.check_dataset().
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python tools/check_dataset.py` from anywhere
    sys.path.insert(0, ROOT)

from data import TOLERATED_KINDS, DataError, check_dataset  # noqa: E402


def main(argv=None):
    check = argparse.ArgumentParser(description="Check an AVSBench dataset layout: list every "
                                                "missing or unreadable file.")
    check.add_argument("--dataset", required=True, choices=["s4", "ms3", "avss", "synthetic"])
    check.add_argument("--data-root", default=None)
    check.add_argument("--deep", action="store_true", help="decode every image and audio file")
    args = check.parse_args(argv)
    tolerated = {}
    try:
        if args.dataset != "synthetic" and args.data_root is None:
            raise DataError(f"--data-root: not given; expected the folder of the {args.dataset} dataset")
        problems = check_dataset(args.data_root, args.dataset, deep=args.deep, tolerated=tolerated)
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        return 2
    for line in problems + [line for lines in tolerated.values() for line in lines]:
        print(line)
    if tolerated:
        counts = "; ".join(f"{len(lines)} {TOLERATED_KINDS[kind]}" for kind, lines in tolerated.items())
        print(f"read with a warning, as the official code reads them: {counts}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) in {args.data_root} ({args.dataset})", file=sys.stderr)
        return 2
    print(f"ok: {args.data_root} has the complete {args.dataset} layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
