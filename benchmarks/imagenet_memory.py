"""Peak RSS of ImageNet's training pipeline against its shuffle buffer (TFDS mock data).

    python benchmarks/imagenet_memory.py
    python benchmarks/imagenet_memory.py --buffers 64 1600 6400 --side 375

Each measurement is a fresh process (`tests/test_imagenet_data.py`'s child) that feeds
`reste_larq.data.imagenet_train_dataset` photo-like JPEGs (smooth gradients plus
noise, 375x500 by default: about ImageNet's mean JPEG size) through TFDS's mock_data
and pulls 6 batches of 8. Prints the peak RSS per buffer size, the growth per buffered
example against the JPEG's and the decoded image's size: decoding after the shuffle
keeps the buffer at compressed bytes.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.test_imagenet_data import peak_rss  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buffers", type=int, nargs="+", default=[64, 1600])
    p.add_argument("--side", type=int, default=375, help="image height (width is 4/3 of it)")
    args = p.parse_args(argv)
    examples = max(args.buffers) + 200
    rows = [(b, peak_rss(b, examples, args.side)) for b in sorted(args.buffers)]
    decoded = args.side * (args.side * 4 // 3) * 3
    print(
        f"{examples} examples of {args.side}x{args.side * 4 // 3}, mean JPEG "
        f"{rows[0][1]['jpeg'] / 1024:.1f} KiB, decoded {decoded / 1024:.1f} KiB"
    )
    print(f"{'buffer':>8}{'peak RSS MiB':>14}{'KiB per extra slot':>20}")
    for (b, r), previous in zip(rows, [None] + rows[:-1]):
        growth = ""
        if previous:
            per_slot = (r["peak"] - previous[1]["peak"]) / (b - previous[0]) / 1024
            growth = f"{per_slot:.1f}"
        print(f"{b:>8}{r['peak'] / 2**20:>14.1f}{growth:>20}")


if __name__ == "__main__":
    main()
