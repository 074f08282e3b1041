"""Query an index made by jobs/index.py: the nearest database keys of each query, with Hamming distances.

    python jobs/search.py indexes/fmnist --query shoe.png bag.png --k 10
    python jobs/search.py indexes/fmnist --query-key img-00001 --k 5

A query is an image file (--query), or the key of an item already in the index (--query-key: its stored code is
the query). Prints one tab-separated line a hit, after a header: query, rank, key, distance, label. Same from
Python: Index.load(uri).search(images, k).
"""

from __future__ import annotations

from pathlib import Path

from _cli import fail, parse, parser


def make_parser():
    p = parser(
        __doc__,
        config=False,
        ray=False,
        prog="search.py",
        first=("index", "index directory or s3:// / gs:// prefix written by jobs/index.py"),
    )
    p.add_argument("--query", nargs="+", default=[], metavar="IMAGE", help="query image files")
    p.add_argument("--query-key", nargs="+", default=[], metavar="KEY", help="keys of indexed items to query with")
    p.add_argument("--k", type=int, default=10, help="hits a query (default 10)")
    return p


def main(argv=None) -> list:
    args = parse(make_parser(), argv)
    if args.k < 1:
        fail(f"--k={args.k}: must be >= 1")
    if not args.query and not args.query_key:
        fail("no query: give --query IMAGE ... or --query-key KEY ...")
    missing = [q for q in args.query if not Path(q).is_file()]
    if missing:
        fail(f"--query: no such file: {', '.join(missing)}")
    from brcd_dist.index import Index  # after the checks: FAISS and torch take seconds to import

    try:
        index = Index.load(args.index)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    results = index.search(args.query, args.k) if args.query else []
    if args.query_key:
        position = {str(key): i for i, key in enumerate(index.keys)}
        unknown = [k for k in args.query_key if k not in position]
        if unknown:
            fail(f"--query-key: not in {args.index}: {', '.join(unknown)} (keys look like {index.keys[0]})")
        results += index.search_codes(index.codes[[position[k] for k in args.query_key]], args.k)
    print("query\trank\tkey\tdistance\tlabel")
    for query, hits in zip([*args.query, *args.query_key], results):
        for rank, hit in enumerate(hits, 1):
            print(f"{query}\t{rank}\t{hit.key}\t{hit.distance}\t{hit.label}")
    return results


if __name__ == "__main__":
    main()
