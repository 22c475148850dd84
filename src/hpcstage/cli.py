"""The `hpcstage` command: argument parsing and printing only; the work is in the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hpcstage import __version__
from hpcstage.errors import HpcstageError
from hpcstage.progress import human_bytes


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=Path, help="hub cache folder (default: HF_HUB_CACHE rules)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary line")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")


def _cmd_pull(args: argparse.Namespace) -> int:
    from hpcstage.errors import BadInput
    from hpcstage.manifest import hub_entry, load_manifest
    from hpcstage.staging import Options, pull, pull_manifest
    from hpcstage.transfer import RetryPolicy

    if bool(args.manifest) == bool(args.repo_ids):
        raise BadInput("give either REPO_ID... or -f MANIFEST (see `hpcstage pull --help`)")
    if args.workers < 1:
        raise BadInput("--workers must be at least 1")
    opts = Options(
        cache_dir=args.cache_dir, workers=args.workers, timeout=args.timeout,
        retry=RetryPolicy(budget=args.retry_budget), quiet=args.quiet or args.json,
    )
    if args.manifest:
        if args.include or args.exclude or args.revision or args.repo_type:
            raise BadInput("--include/--exclude/--revision/--repo-type go in the manifest when -f is used")
        summary = pull_manifest(load_manifest(args.manifest), opts, update=args.update)
    else:
        entries = [
            hub_entry(repo=r, repo_type=args.repo_type or "model", revision=args.revision or "main",
                      include=args.include or None, exclude=args.exclude or None)
            for r in args.repo_ids
        ]
        summary, _ = pull(entries, opts)
    if args.json:
        print(json.dumps(summary.as_dict(), indent=1))
    elif not args.quiet:
        rate = summary.downloaded_bytes / summary.seconds if summary.seconds else 0
        for r in summary.repos:
            print(f"{r.repo_type} {r.repo_id}@{r.revision} ({r.commit[:12]}): {r.files} files, "
                  f"{human_bytes(r.bytes)} -> {r.snapshot}")
        print(f"staged {summary.files} files ({human_bytes(summary.bytes)}); downloaded {summary.downloaded_files} "
              f"({human_bytes(summary.downloaded_bytes)}) in {summary.seconds:.1f}s ({human_bytes(rate)}/s)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from hpcstage.samples import make_samples
    from hpcstage.serve import serve_forever

    if args.samples:
        make_samples(args.root)
    elif not args.root.is_dir():
        from hpcstage.errors import BadInput

        raise BadInput(f"{args.root} is not a folder; create it or pass --samples to generate sample repos")
    serve_forever(args.root, args.host, args.port, log_file=args.log_file)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpcstage", description=__doc__)
    parser.add_argument("--version", action="version", version=f"hpcstage {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="stage Hub repos into the hub cache")
    p.add_argument("repo_ids", nargs="*", metavar="REPO_ID")
    p.add_argument("-f", "--manifest", type=Path, help="pull every entry of this manifest; writes hpcstage.lock beside it")
    p.add_argument("--repo-type", choices=["model", "dataset"])
    p.add_argument("--revision", help="branch, tag or commit sha (default main)")
    p.add_argument("--include", action="append", metavar="GLOB", help="only files matching (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching (repeatable)")
    p.add_argument("--update", action="store_true", help="re-resolve revisions instead of the lockfile's commits")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a connection or for data (default 30)")
    p.add_argument("--retry-budget", type=float, default=300.0,
                   help="seconds one request may spend retrying 429/5xx/network errors (default 300)")
    _common(p)
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("serve", help="serve repos from a folder over the Hub protocol (demo and tests)")
    p.add_argument("root", type=Path, help="folder with models/<org>/<name>/ and datasets/<org>/<name>/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--samples", action="store_true", help="first write the bundled sample repos into ROOT")
    p.add_argument("--log-file", type=Path, help="append each request as a JSON line")
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except HpcstageError as e:
        print(f"hpcstage: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hpcstage: interrupted", file=sys.stderr)
        return 130
