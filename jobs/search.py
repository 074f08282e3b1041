"""Query an index made by jobs/index.py: the nearest database keys of each query image, with Hamming distances.

    python jobs/search.py indexes/fmnist --query shoe.png bag.png --k 10

Prints one line a hit: query, rank, key, distance, label. Same from Python: Index.load(uri).search(images, k).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _cli import fail


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index", help="index directory or s3:// / gs:// prefix written by jobs/index.py")
    p.add_argument("--query", nargs="+", required=True, help="query image files")
    p.add_argument("--k", type=int, default=10, help="hits a query (default 10)")
    args = p.parse_args(argv)
    if args.k < 1:
        fail(f"--k={args.k}: must be >= 1")
    missing = [q for q in args.query if not Path(q).is_file()]
    if missing:
        fail(f"--query: no such file: {', '.join(missing)}")
    from brcd_dist.index import Index  # after the checks: FAISS and torch take seconds to import

    try:
        index = Index.load(args.index)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    results = index.search(args.query, args.k)
    print("query\trank\tkey\tdistance\tlabel")
    for query, hits in zip(args.query, results):
        for rank, hit in enumerate(hits, 1):
            print(f"{query}\t{rank}\t{hit.key}\t{hit.distance}\t{hit.label}")
    return results


if __name__ == "__main__":
    main()
