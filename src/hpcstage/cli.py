"""The `hpcstage` command: argument parsing and printing only; the work is in the library.

Why one module of about 800 lines: every command's options and help text are in one parser (`build_parser`,
about 200 lines), so each option's spelling, default and help text are defined in one place; each `_cmd_*`
is one command's thin shell (parse, call the library, print, exit code), none longer than about 100 lines."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path

from hpcstage import __version__
from hpcstage.errors import BadInput, HpcstageError
from hpcstage.progress import human_bytes

DESCRIPTION = """\
Stage Hugging Face models and datasets onto a shared filesystem for offline Slurm jobs: pull them into
the standard hub cache (hash-checked, resumable, safe with many nodes at once), verify them offline,
prebuild the datasets Arrow caches, check that every entry loads with the network off, and launch jobs.
Start with `hpcstage pull ORG/NAME` or `hpcstage pull -f hpcstage.yaml`; each command's --help lists
its options."""


def _common(p: argparse.ArgumentParser, workers: str | None = None) -> None:
    p.add_argument("--cache-dir", type=Path, help="hub cache folder (default: HF_HUB_CACHE rules)")
    if workers:
        p.add_argument("--workers", type=int, default=8, help=f"{workers} (default 8)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary line")
    p.add_argument("-v", "--verbose", action="store_true", help="log each step")


def _cmd_pull(args: argparse.Namespace) -> int:
    from hpcstage.hub.pull import pull
    from hpcstage.manifest import load_manifest
    from hpcstage.options import Options
    from hpcstage.staging import pull_manifest
    from hpcstage.transfer import RetryPolicy

    updates = args.update or []
    if not args.manifest and not args.repo_ids and len(updates) == 1 and updates[0] != "*":
        args.repo_ids, updates = updates, []  # `pull --update ORG/NAME`: argparse took the repo for NAME
    if bool(args.manifest) == bool(args.repo_ids):
        raise BadInput("give either REPO_ID... or -f MANIFEST (see `hpcstage pull --help`)")
    update = True if "*" in updates else (updates or False)
    if args.workers < 1:
        raise BadInput("--workers must be at least 1")
    if args.max_connections < 1:
        raise BadInput(f"--max-connections {args.max_connections}: give at least 1 (default 32)")
    if args.timeout <= 0 or args.retry_budget < 0:
        raise BadInput("--timeout must be more than 0 seconds and --retry-budget not negative")
    opts = Options(
        cache_dir=args.cache_dir,
        workers=args.workers,
        max_connections=args.max_connections,
        timeout=args.timeout,
        retry=RetryPolicy(budget=args.retry_budget),
        quiet=args.quiet or args.json,
        shared_group=args.shared_group,
    )
    if (args.slurm_array is not None or args.worker) and not args.manifest:
        raise BadInput("--slurm-array and --worker need -f MANIFEST")
    if updates and not args.manifest:
        raise BadInput(
            "--update needs -f MANIFEST: it re-resolves what the lockfile pinned (a pull of REPO_IDs "
            "always resolves the revision)"
        )
    if args.local_dir is not None and args.manifest:
        raise BadInput("--local-dir copies one repo: use it with REPO_ID [FILE...], not -f")
    if args.local_dir is not None and args.local_dir.exists() and not args.local_dir.is_dir():
        raise BadInput(f"--local-dir {args.local_dir} is a file; name a folder")
    manifest = load_manifest(args.manifest) if args.manifest else None
    if manifest is not None:
        if not manifest.entries and not manifest.data_entries:
            raise BadInput(
                f"{args.manifest} lists no models: or datasets: entries, so there is nothing to pull; "
                "add entries (see the Manifest section of the README)"
            )
        from hpcstage.options import entry_names

        known = {n for e in [*manifest.entries, *manifest.data_entries] for n in entry_names(e)}
        unknown = [u for u in updates if u != "*" and u not in known]
        if unknown:
            names = sorted(
                {getattr(e, "repo", "") or getattr(e, "dest", "") for e in [*manifest.entries, *manifest.data_entries]}
            )
            raise BadInput(f"--update {unknown[0]}: no such entry in {args.manifest}; name one of {', '.join(names)}")
    if args.slurm_array is not None:
        return _pull_array(args, manifest, opts, update)
    entries: list = []
    named: dict[str, list[str]] = {}  # entry key -> the FILEs named after its REPO_ID
    if manifest is not None:
        if args.include or args.exclude or args.revision or args.repo_type:
            raise BadInput("--include/--exclude/--revision/--repo-type go in the manifest when -f is used")
    else:
        entries, named = _command_line_entries(args)
        if args.local_dir is not None and len(entries) != 1:
            raise BadInput("--local-dir copies one repo: give one REPO_ID (and optionally its FILEs)")
    if manifest is not None:
        summary = pull_manifest(manifest, opts, update=update, worker=args.worker)
    else:
        summary, _ = pull(entries, opts, files=named)
        if args.local_dir is not None:
            from hpcstage.hub.pull import materialise

            copied = materialise(summary.repos[0].snapshot, args.local_dir, entries[0])
            if not args.json and not args.quiet:
                print(f"copied {copied} files into {args.local_dir} (plain files; the cache keeps its own copy)")
    if args.json:
        print(json.dumps({"ok": True, "failures": [], **summary.as_dict()}, indent=1))
    elif not args.quiet:
        rate = summary.downloaded_bytes / summary.seconds if summary.seconds else 0
        for r in summary.repos:
            print(
                f"{r.repo_type} {r.repo_id}@{r.revision} ({r.commit[:12]}): {r.files} files, "
                f"{human_bytes(r.bytes)} -> {r.snapshot}"
            )
        print(
            f"staged {summary.files} files ({human_bytes(summary.bytes)}); downloaded {summary.downloaded_files} "
            f"({human_bytes(summary.downloaded_bytes)}) in {summary.seconds:.1f}s ({human_bytes(rate)}/s)"
        )
    return 0


def _command_line_entries(args: argparse.Namespace) -> tuple[list, dict[str, list[str]]]:
    """REPO_ID... or, as with `hf download`, REPO_ID FILE...: a name with exactly one `/` is a repo id; any
    other (`config.json`, `data/train/x.parquet`) is a file of the repo before it. A file at `dir/name`
    (one slash) is given with --include dir/name. Returns the entries and, per entry key, the files named."""
    import glob

    from hpcstage.manifest import hub_entry

    groups: list[tuple[str, list[str]]] = []
    for name in args.repo_ids:
        if not groups or (name.count("/") == 1 and not name.startswith("/") and not name.endswith("/")):
            groups.append((name, []))  # the first is always a repo (an invalid id is said so)
        else:
            groups[-1][1].append(name)
    entries = []
    named: dict[str, list[str]] = {}
    for repo, files in groups:
        include = (args.include or []) + [glob.escape(f) for f in files]
        entry = hub_entry(
            repo=repo,
            repo_type=args.repo_type or "model",
            revision=args.revision or "main",
            include=include or None,
            exclude=args.exclude or None,
        )
        if files:
            named[entry.key] = files
        entries.append(entry)
    return entries, named


def _pull_array(args: argparse.Namespace, manifest, opts, update=False) -> int:
    from hpcstage.hfcache import default_cache_dir
    from hpcstage.slurm.launch import check_account, resolve_cluster
    from hpcstage.slurm.limits import preflight_time
    from hpcstage.slurm.stage_array import follow, submit_array, worker_environment
    from hpcstage.staging import plan_manifest

    cluster = resolve_cluster(args.cluster, args.partition, args.account)  # bad input: refused before any request
    if args.slurm_array < 1:
        raise BadInput("--slurm-array needs at least 1 worker")
    if not cluster.internet:
        raise BadInput(
            f"--slurm-array: {cluster.name}'s compute nodes have no internet, so array workers cannot "
            f"download; pull on the login node instead: `hpcstage pull -f {args.manifest}`"
        )
    time_limit = preflight_time(cluster, cluster.partition, args.time, "--time")
    check_account(cluster)
    env = worker_environment(cluster)  # a secrets file others can read is refused before anything is planned
    for warning in env.warnings:
        print(f"hpcstage: warning: {warning}", file=sys.stderr)
    plan = plan_manifest(manifest, opts, update=update)
    print(
        f"planned {plan.files} files ({human_bytes(plan.bytes)}) into {manifest.lock_path}; "
        f"{plan.downloaded_files} to fetch ({human_bytes(plan.downloaded_bytes)})",
        flush=True,
    )
    run = submit_array(
        manifest, args.slurm_array, cluster=cluster, time_limit=time_limit, cache_dir=args.cache_dir, env=env
    )
    print(
        f"submitted {args.slurm_array} workers as array {run.array_id} on {cluster.name}; finish {run.finish_id} "
        f"(pull leftovers + verify), report {run.report_id} (status); scripts and logs in {run.folder}",
        flush=True,
    )
    if not args.wait:
        return 0
    if follow(run, manifest, opts.cache_dir or manifest.cache_dir or default_cache_dir(), quiet=args.quiet):
        print(f"staged and verified: {plan.files} files")
        return 0
    print(
        f"hpcstage: error: the array did not finish cleanly; see {run.folder} and `hpcstage status -f {args.manifest}`",
        file=sys.stderr,
    )
    return 1


def _cmd_prebuild(args: argparse.Namespace) -> int:
    from hpcstage.arrowcache import builds_from_experiment, builds_from_manifest, prebuild
    from hpcstage.manifest import load_manifest
    from hpcstage.progress import stamp

    if not args.manifest and not args.from_experiment:
        raise BadInput("give -f MANIFEST and/or --from-experiment FILE (see `hpcstage prebuild --help`)")
    manifest = load_manifest(args.manifest) if args.manifest else None
    builds = builds_from_manifest(manifest) if manifest else []
    if args.from_experiment:
        builds += [b for b in builds_from_experiment(args.from_experiment) if b.key not in {x.key for x in builds}]
    quiet = args.quiet or args.json

    def event(kind: str, text: str) -> None:
        if quiet:
            return
        if kind == "start":
            print(f"{stamp()} CACHE_PREBUILD: Pre-building HF datasets cache\nUnique datasets: {text}", flush=True)
        elif kind == "stack":
            print(f"Job Python: {text}", flush=True)
        elif kind == "built":
            print(f"{stamp()} CACHE_BUILT: {text}", flush=True)
        elif kind == "skipped":
            print(f"{stamp()} CACHE_SKIPPED: {text} (already built)", flush=True)
        elif kind == "missing":
            print(f"{stamp()} CACHE_WARNING: {text}: data file not found; skipped", flush=True)
        else:
            print(f"{stamp()} CACHE_FAILED: {text}", flush=True)

    summary = prebuild(
        builds,
        manifest=manifest,
        cache_dir=args.cache_dir,
        python=args.python,
        datasets_cache_dir=args.datasets_cache_dir,
        on_event=event,
        force=args.force,
    )
    if args.json:
        print(json.dumps(summary.as_dict(), indent=1))
    elif not quiet:
        failed = [r for r in summary.results if r.status == "failed"]
        if failed:
            print(f"{stamp()} CACHE_PREBUILD_FAILED: {len(failed)} of {len(summary.results)} builds failed", flush=True)
        else:  # the log format; skipped (missing) paths follow as warnings
            print(f"{stamp()} CACHE_PREBUILD_COMPLETE: All dataset caches ready", flush=True)
        for w in summary.warnings:
            print(f"Warning: {w}")
    return 0 if summary.ok else 1


def _cmd_check(args: argparse.Namespace) -> int:
    from hpcstage.manifest import load_manifest
    from hpcstage.offline import check

    report = check(
        load_manifest(args.manifest),
        cache_dir=args.cache_dir,
        python=args.python,
        datasets_cache_dir=args.datasets_cache_dir,
        isolation=args.isolation,
    )
    stack = report.stack.describe() if report.stack else ""
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
    elif not args.quiet:
        if sys.stdout.isatty():
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text

            table = Table(title=f"offline check (network off: {report.isolation})", caption=f"job Python: {stack}")
            for col in ("entry", "status", "fix"):
                table.add_column(col, overflow="fold")
            for e in report.entries:
                status = Text("ok", style="green") if e.ok else Text("; ".join(e.problems), style="red")
                table.add_row(Text(e.entry), status, Text(e.fix or ""))
            Console().print(table)
        else:
            print(f"job Python: {stack}")
            for e in report.entries:
                print(
                    f"{'ok' if e.ok else 'MISSING'}\t{e.entry}"
                    + ("" if e.ok else f"\t{'; '.join(e.problems)}\tfix: {e.fix}")
                )
        bad = sum(not e.ok for e in report.entries)
        print(
            f"{'ready' if report.ok else 'NOT READY'}: {len(report.entries) - bad} of {len(report.entries)} "
            f"entries load offline (network off: {report.isolation}, {report.seconds:.1f}s)"
        )
    return 0 if report.ok else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from hpcstage.verification import verify

    manifest = None
    if args.manifest:  # pydantic and yaml only when there is a manifest (~0.1 s of a 20,000-file verify)
        from hpcstage.manifest import load_manifest

        manifest = load_manifest(args.manifest)
    if manifest is not None and not manifest.entries and not manifest.data_entries:
        raise BadInput(f"{args.manifest} lists no models: or datasets: entries, so there is nothing to verify")
    if args.timeout <= 0 or args.retry_budget < 0:
        raise BadInput("--timeout must be more than 0 seconds and --retry-budget not negative")
    options = None
    if args.repair:  # the repair's fetches: the same settings a pull takes (imported only then)
        from hpcstage.options import Options
        from hpcstage.transfer import RetryPolicy

        options = Options(timeout=args.timeout, retry=RetryPolicy(budget=args.retry_budget))
    report = verify(
        args.repo_ids or None,
        manifest=manifest,
        repo_type=args.repo_type,
        revision=args.revision,
        cache_dir=args.cache_dir,
        workers=args.workers,
        repair=args.repair,
        shared_group=args.shared_group,
        quiet=args.quiet or args.json,
        options=options,
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
        return 0 if report.ok else 1
    for p in report.repaired:
        print(f"repaired {p.kind}: {p.repo_type} {p.repo_id}@{(p.commit or '')[:12]} {p.path}")
    for p in report.problems:
        print(p)
    if args.repair and report.problems:
        print(
            "hpcstage: error: --repair could not fix the problems above; each names what is left to do", file=sys.stderr
        )
    if not args.quiet:
        rate = report.bytes_hashed / report.seconds if report.seconds else 0
        print(
            f"{'ok' if report.ok else 'FAILED'}: {report.files} files in {report.snapshots} snapshots of "
            f"{report.repos} repos; hashed {report.blobs_hashed} blobs ({human_bytes(report.bytes_hashed)}) in "
            f"{report.seconds:.1f}s ({human_bytes(rate)}/s); {len(report.problems)} problems"
            + (f", {len(report.repaired)} repaired" if args.repair else "")
        )
    return 0 if report.ok else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from hpcstage.slurm.records import experiment_status

    if args.experiment and args.manifest:
        raise BadInput("give either -f MANIFEST (staging) or --experiment DIR (jobs), not both")
    if not args.experiment:
        return _staging_status(args)
    rows = experiment_status(args.experiment)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        detail = f" ({r['reason']})" if r["reason"] else ""
        code = f" exit {r['exit_code']}" if r["exit_code"] is not None else ""
        attempt = f" attempt {r['attempt']}" if r["attempt"] else ""
        print(f"{r['key']}{attempt}\t{r['job_id'] or '-'}\t{r['state']}{detail}{code}")
    from hpcstage.slurm.jobs import JobState

    for r in rows:  # a reason that never clears: say so, and what to do
        why = JobState(r["job_id"] or "-", "", r["state"], r["reason"]).why_never()
        if why:
            print(f"hpcstage: warning: {why}", file=sys.stderr)
    return 0


def _staging_status(args: argparse.Namespace) -> int:
    """What is staged, partial, locked or failed: per manifest entry, or every artifact pulled into the cache."""
    from dataclasses import asdict

    from hpcstage.hfcache import check_cache_dir, default_cache_dir
    from hpcstage.ledger import ArtifactStatus, Unreadable, artifact_status, read_all_checked
    from hpcstage.manifest import load_lock, load_manifest

    if args.manifest:
        manifest = load_manifest(args.manifest)
        cache_dir = args.cache_dir or manifest.cache_dir or default_cache_dir()
        lock = load_lock(manifest.lock_path, manifest.path)
        rows = []
        for e in manifest.entries:
            locked = lock.entries.get(e.key)
            rows.append(
                artifact_status(
                    cache_dir,
                    e.repo_type,
                    e.repo,
                    e.revision,
                    locked.commit if locked else None,
                    locked.cached_files() if locked and locked.matches(e) else None,
                )
            )
        if manifest.data_entries:
            from hpcstage.datadir import data_status

            rows += data_status(manifest, lock, cache_dir)
    else:
        cache_dir = args.cache_dir or default_cache_dir()
        check_cache_dir(cache_dir)
        if not cache_dir.is_dir():
            raise BadInput(f"no hub cache at {cache_dir}; pass the --cache-dir you pulled into (or set HF_HUB_CACHE)")
        rows = []
        for r in read_all_checked(cache_dir):
            if isinstance(r, Unreadable):  # reported, never hidden: the artifact it describes is unknown now
                what = r.artifact()
                kind, repo, rev = what or ("model", r.path.name, "?")
                fix = (
                    f"run `hpcstage pull {repo}{'' if kind == 'model' else f' --repo-type {kind}'} --revision "
                    f"{rev} --cache-dir {cache_dir}` to record it again"
                    if what
                    else f"delete {r.path}"
                )
                rows.append(
                    ArtifactStatus(
                        kind,
                        repo,
                        rev,
                        None,
                        "unreadable",
                        0,
                        0,
                        reason=f"ledger record {r.path} unreadable ({r.why}); {fix}",
                    )
                )
                continue
            rows.append(artifact_status(cache_dir, r.repo_type, r.repo, r.revision, record=r))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    for row in [] if args.json else rows:
        extra = [f"{row.staged_files}/{row.files} files"]
        if row.partial_percent is not None:
            extra.append(f"partial {row.partial_percent:.0f}%")
        if row.locked_by:
            extra.append("locked by " + ", ".join(row.locked_by))
        if row.reason:
            extra.append(row.reason)
        name = f"{row.repo}@{row.revision}" if row.revision else row.repo  # data entries have no revision
        print(f"{row.repo_type} {name}\t{row.state}\t" + "; ".join(extra))
    if not args.json:
        from hpcstage.progress import human_bytes
        from hpcstage.xetstore import XetStore

        store = XetStore(Path(cache_dir))
        if store.is_marked():
            s = store.saved()
            cleanup = "hpcstage cleanup" + (f" --cache-dir {shlex.quote(str(cache_dir))}" if args.cache_dir else "")
            print(
                f"xet store\t{s.contents} contents, {human_bytes(s.stored)} stored, {human_bytes(s.saved)} saved "
                f"({s.links} links)"
                + (f"; {s.unreferenced} unreferenced: `{cleanup}` removes them" if s.unreferenced else "")
            )
    return 0 if all(r.state == "staged" for r in rows) else 1


def _cmd_cleanup(args: argparse.Namespace) -> int:
    from hpcstage.cleanup import cleanup
    from hpcstage.hfcache import check_cache_dir, default_cache_dir

    if args.older_than < 0:
        raise BadInput(f"--older-than {args.older_than:g}: an age in hours is 0 or more")
    cache_dir = args.cache_dir or default_cache_dir()
    check_cache_dir(cache_dir)
    from hpcstage.datadir import default_data_dir

    if not cache_dir.is_dir() and not (args.data_dir or default_data_dir(cache_dir)).is_dir():
        raise BadInput(
            f"no hub cache at {cache_dir} (nor a data folder beside it); pass the --cache-dir you pulled "
            "into (or set HF_HUB_CACHE)"
        )
    found = cleanup(args.cache_dir, data_dir=args.data_dir, older_than=args.older_than * 3600, dry_run=args.dry_run)
    for item in found:
        print(f"{'would remove' if args.dry_run else 'removed'} {item.path} ({item.why})")
    if not found:
        print("nothing to clean up")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from hpcstage.doctor import as_json, exit_code, run_checks
    from hpcstage.manifest import load_manifest

    if args.timeout <= 0:
        raise BadInput("--timeout must be more than 0 seconds")
    checks = run_checks(load_manifest(args.manifest) if args.manifest else None, args.cache_dir, timeout=args.timeout)
    if args.json:
        print(as_json(checks))
    elif sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        table = Table(title="hpcstage doctor")
        for col in ("check", "status", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for c in checks:
            table.add_row(c.name, Text(c.status, style=colour[c.status]), Text(c.detail), Text(c.fix))
        Console().print(table)
    else:
        for c in checks:
            if not args.quiet or c.status != "ok":
                print(f"{c.status}\t{c.name}\t{c.detail}" + (f"\tfix: {c.fix}" if c.fix else ""))
    if not args.json and not args.quiet:
        counts = {s: sum(c.status == s for c in checks) for s in ("ok", "warn", "fail")}
        print(f"doctor: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    return exit_code(checks)


def _cmd_serve(args: argparse.Namespace) -> int:
    from hpcstage.testing.hub import serve_forever
    from hpcstage.testing.samples import make_samples

    if args.samples:
        make_samples(args.root)
    elif not args.root.is_dir():
        raise BadInput(f"{args.root} is not a folder; create it or pass --samples to generate sample repos")
    if not 0 <= args.port <= 65535:
        raise BadInput(f"--port {args.port}: a port is 0-65535 (0 picks a free one)")
    import errno
    import socket

    if args.port:  # a busy port is bad input, said before anything starts
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                probe.bind((args.host, args.port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise BadInput(
                        f"port {args.port} on {args.host} is in use; pick another with --port, or "
                        "--port 0 for a free one (the URL is printed)"
                    ) from None
                if e.errno == errno.EACCES:
                    raise BadInput(f"port {args.port} needs privileges; use one above 1023, or --port 0") from None
                raise BadInput(f"cannot listen on {args.host}:{args.port} ({e.strerror}); check --host") from None
    limit = None
    if args.rate_limit:
        quota, _, window = args.rate_limit.partition("/")
        if not (quota.isdigit() and window.isdigit() and int(quota) > 0 and int(window) > 0):
            raise BadInput(
                f"--rate-limit {args.rate_limit!r}: give resolver requests per window in seconds, "
                "e.g. --rate-limit 3000/300"
            )
        limit = (int(quota), int(window))
    for flag, value in (("--conn-rate-mb", args.conn_rate_mb), ("--latency-ms", args.latency_ms)):
        if value is not None and not value > 0:
            raise BadInput(f"{flag} {value:g}: give a number above 0, or leave the flag out")

    def setup(server) -> None:
        for repo in args.gated:
            server.gate(repo, granted=tuple(args.token))
        if args.token:
            server.tokens = set(args.token)
        if limit:
            server.limit_resolvers(*limit)
        server.ignore_range = args.ignore_range
        server.xet = args.xet
        if args.conn_rate_mb:
            server.conn_rate = args.conn_rate_mb * 1e6
        if args.latency_ms:
            from hpcstage.testing.hub import FaultRule

            server.add_fault(FaultRule(path="", delay=args.latency_ms / 1000))

    serve_forever(args.root, args.host, args.port, log_file=args.log_file, setup=setup)
    return 0


_PYTHON_HELP = (
    "the jobs' interpreter, where the loads run (default: the manifest's `python:`, else "
    "HPCSTAGE_PYTHON, else hpcstage's own)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpcstage", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"hpcstage {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pull",
        help="stage Hub repos into the hub cache",
        usage="hpcstage pull REPO_ID [FILE...] [REPO_ID [FILE...]...] [options] | -f MANIFEST [options]",
    )
    p.add_argument(
        "repo_ids",
        nargs="*",
        metavar="REPO_ID [FILE...]",
        help="repos (ORG/NAME); names after a repo without exactly one `/` (config.json, "
        "data/train/x.parquet) are its files, staged alone as `hf download REPO FILE...` does",
    )
    p.add_argument(
        "-f", "--manifest", type=Path, help="pull every entry of this manifest; writes hpcstage.lock beside it"
    )
    p.add_argument("--repo-type", choices=["model", "dataset"])
    p.add_argument("--revision", help="branch, tag or commit sha (default main)")
    p.add_argument("--include", action="append", metavar="GLOB", help="only files matching (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip files matching (repeatable)")
    p.add_argument(
        "--update",
        nargs="?",
        const="*",
        action="append",
        metavar="NAME",
        help="with -f: re-resolve revisions instead of the lockfile's commits, and ask url: sources if "
        "they changed (a conditional request; unchanged ones download nothing); NAME (repeatable): "
        "only that entry (repo id, data dest or url)",
    )
    p.add_argument(
        "--local-dir",
        type=Path,
        metavar="DIR",
        help="also copy the repo's snapshot into DIR as plain files (like `hf download --local-dir`)",
    )
    g = p.add_argument_group("staging as a Slurm job array (with -f)")
    g.add_argument(
        "--slurm-array",
        type=int,
        metavar="N",
        help="plan here, then stage on N array workers that share the work through the leases",
    )
    g.add_argument("--cluster", help="registry name (default: detected; see `hpcstage clusters`)")
    g.add_argument("--partition", help="override the registry's partition (e.g. a data-mover partition)")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--time", help="time limit of each worker (default: the cluster's longest)")
    g.add_argument("--wait", action="store_true", help="follow the array with a progress bar; exit with its result")
    g.add_argument("--worker", action="store_true", help="run as one of the array's workers (set by --slurm-array)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for a connection or for data (default 30)"
    )
    p.add_argument(
        "--retry-budget",
        type=float,
        default=900.0,
        help="seconds one request may spend retrying 429/5xx/network errors and waiting out the Hub's "
        "rate limit (default 900: a 5-minute window more than once)",
    )
    p.add_argument(
        "--shared-group",
        metavar="GROUP",
        help="group-shared cache: folders setgid + group-writable, files group-readable",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=32,
        metavar="N",
        help="range requests at once for all large files; fewer are used while more do not "
        "raise the throughput (default 32)",
    )
    _common(p, workers="files downloaded at once")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("verify", help="offline: hash every staged file against the lockfile or trees/<commit>.json")
    p.add_argument("repo_ids", nargs="*", metavar="REPO_ID", help="default: every repo in the cache")
    p.add_argument("-f", "--manifest", type=Path, help="check this manifest's entries against hpcstage.lock beside it")
    p.add_argument("--repo-type", choices=["model", "dataset"])
    p.add_argument("--revision", help="only this branch, tag or commit (default: every snapshot)")
    p.add_argument(
        "--repair", action="store_true", help="refetch only the bad files (uses the network), then verify again"
    )
    p.add_argument("--shared-group", metavar="GROUP", help="give repaired repos this group's bits")
    p.add_argument("--timeout", type=float, default=30.0, help="--repair: as for pull (default 30)")
    p.add_argument("--retry-budget", type=float, default=900.0, help="--repair: as for pull (default 900)")
    _common(p, workers="large files hashed at once (small ones: one thread unless the filesystem is slow)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("prebuild", help="build the datasets Arrow caches jobs will load offline, one writer each")
    p.add_argument("-f", "--manifest", type=Path, help="datasets entries with `load:` and `prebuild:` entries")
    p.add_argument(
        "--from-experiment",
        type=Path,
        metavar="FILE",
        help="experiment_summary.yaml: build each evaluation.tasks[].dataset as json, field=test",
    )
    p.add_argument(
        "--datasets-cache-dir", type=Path, help="Arrow cache folder (default: manifest, else HF_DATASETS_CACHE rules)"
    )
    p.add_argument("--python", metavar="PATH", help=_PYTHON_HELP)
    p.add_argument("--force", action="store_true", help="build and prove again even where a finished build is recorded")
    _common(p)
    p.set_defaults(func=_cmd_prebuild)

    p = sub.add_parser("check", help="offline readiness: load every entry as a job would, with the network off")
    p.add_argument("-f", "--manifest", type=Path, required=True)
    p.add_argument(
        "--datasets-cache-dir", type=Path, help="Arrow cache folder (default: manifest, else HF_DATASETS_CACHE rules)"
    )
    p.add_argument(
        "--isolation",
        choices=["auto", "netns", "guard"],
        default="auto",
        help="network off by `unshare -n` (netns) or a socket guard in the child (default: netns if possible)",
    )
    p.add_argument("--python", metavar="PATH", help=_PYTHON_HELP)
    _common(p)
    p.set_defaults(func=_cmd_check)

    from hpcstage.slurm.commands import add_clusters_parser, add_launch_parser

    add_launch_parser(sub)
    add_clusters_parser(sub)

    p = sub.add_parser("status", help="what is staged, partial, locked or failed; or an experiment's Slurm jobs")
    p.add_argument(
        "-f", "--manifest", type=Path, help="the entries of this manifest (default: all pulled into the cache)"
    )
    p.add_argument("--cache-dir", type=Path, help="hub cache folder (default: manifest, else HF_HUB_CACHE rules)")
    p.add_argument("--experiment", type=Path, metavar="DIR", help="experiment folder written by `hpcstage launch`")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cleanup", help="remove expired leases and abandoned partial files (never live ones)")
    p.add_argument("--cache-dir", type=Path, help="hub cache folder (default: HF_HUB_CACHE rules)")
    p.add_argument(
        "--data-dir", type=Path, help="folder of url/local/file entries (default: hpcstage-data beside the cache)"
    )
    p.add_argument(
        "--older-than",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="partial and temporary files untouched this long are abandoned (default 24)",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.set_defaults(func=_cmd_cleanup)

    p = sub.add_parser(
        "doctor", help="disk, quota, memory, filesystem, permissions, token, endpoint: ok/warn/fail with fixes"
    )
    p.add_argument(
        "-f", "--manifest", type=Path, help="check space against this manifest's plan (hpcstage.lock beside it)"
    )
    p.add_argument(
        "--timeout", type=float, default=2.0, help="seconds for each network check and the quota tool (default 2)"
    )
    _common(p)
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("serve", help="serve repos from a folder over the Hub protocol (demo and tests)")
    p.add_argument("root", type=Path, help="folder with models/<org>/<name>/ and datasets/<org>/<name>/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--samples", action="store_true", help="first write the bundled sample repos into ROOT")
    p.add_argument("--log-file", type=Path, help="append each request as a JSON line")
    p.add_argument(
        "--gated",
        action="append",
        default=[],
        metavar="ORG/NAME",
        help="a gated repo: listed publicly, files refused (401 without a token, 403 without access)",
    )
    p.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN",
        help="a valid token, with access to the gated repos; any other token gets 401 Invalid credentials",
    )
    p.add_argument("--rate-limit", metavar="Q/W", help="resolver requests per fixed window of W seconds, e.g. 3000/300")
    p.add_argument("--ignore-range", action="store_true", help="answer 200 with the whole body to ranged requests")
    p.add_argument(
        "--xet",
        action="store_true",
        help="list xetHash for LFS files (hf_xet) and answer X-Xet-Hash; huggingface_hub clients then "
        "need HF_HUB_DISABLE_XET=1 (this server does not speak the Xet protocol)",
    )
    p.add_argument(
        "--conn-rate-mb",
        type=float,
        metavar="MB",
        help="send each connection's answers at this many MB/s (a CDN's per-connection cap, a long path)",
    )
    p.add_argument("--latency-ms", type=float, metavar="MS", help="answer every request (hub and CDN) this late")
    p.set_defaults(func=_cmd_serve)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm's scancel, a time limit): handled like Ctrl-C, exit 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _failure_json(e: HpcstageError, pull: bool) -> dict:
    out = {"ok": False, "error": str(e), "exit_code": e.exit_code}
    if pull:
        out["failures"] = getattr(e, "failures", [])
        if hasattr(e, "summary"):
            out.update(e.summary.as_dict())
    return out


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except HpcstageError as e:
        if getattr(args, "json", False):  # stdout stays JSON: the error, and for a pull every failure and
            print(json.dumps(_failure_json(e, pull=args.func is _cmd_pull), indent=1))  # what did get staged
        print(f"hpcstage: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        # Partial pieces are recorded and leases released; threads stuck in a read are not waited for.
        code = 143 if isinstance(e, Terminated) else 130
        print(
            f"hpcstage: {'terminated' if code == 143 else 'interrupted'}; run the same command again to continue",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(code)
    except BrokenPipeError:  # `hpcstage status | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        print(f"hpcstage: error: {e}", file=sys.stderr)
        return 1
