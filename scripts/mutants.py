#!/usr/bin/env python3
"""Mutation testing of the modules behind the README's guarantees (`make mutants`).

For each critical module, cosmic-ray changes one operator, constant or condition at a time and runs the
test files that cover the module; a mutant the tests do not notice "survives" and is listed. Mutants are
applied to a copy of the checkout (cosmic-ray edits files in place), and the tests' subprocesses import
that copy (PYTHONPATH), so CLI tests see the mutant too.

    python scripts/mutants.py [MODULE ...]      # default: all of MODULES; e.g. `policy archive transfer.http`
    make mutants MUTANTS="policy locks"

Slow by nature (one test run per mutant): not part of `make test`. Prints per module the mutants killed,
the survivors (file:line, operator) and the time taken; writes mutants/report.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# module (dotted below src/hpcstage: `transfer.http` is src/hpcstage/transfer/http.py) -> the test selection that
# covers it (fast enough to run once per mutant)
MODULES: dict[str, list[str]] = {
    "policy": ["tests/test_policy.py", "tests/test_manifest.py", "tests/test_security.py::test_bad_site_policy_is_exit_2_naming_the_file",
               "tests/test_guarantees.py::test_a_hostile_revision_is_refused_before_any_request",
               "tests/test_guarantees.py::test_a_hostile_lockfile_path_is_refused_and_nothing_is_written",
               "tests/test_security.py::test_hostile_tree_entries_are_refused_and_nothing_is_written_outside_the_cache",
               "tests/test_security.py::test_site_policy_refuses_with_exit_2_before_any_request"],
    # not the two bombs (300 MB of zeros each): the inclusive-limits test covers the same checks
    "archive": [f"tests/test_archive.py::{t}" for t in (
        "test_a_later_copy_of_a_name_wins_as_tar_does", "test_a_colon_after_a_digit_is_a_plain_name_not_a_drive",
        "test_each_limit_allows_exactly_its_value_and_refuses_one_more",
        "test_hostile_tar_is_refused_with_nothing_written_outside_and_no_dest",
        "test_hostile_zip_is_refused_with_nothing_written", "test_links_inside_the_tree_are_kept",
        "test_too_many_members_is_refused", "test_zip_unpacks_byte_exact_and_strip_components",
        "test_every_tar_format_unpacks_byte_exact_with_hashes", "test_setuid_setgid_and_group_write_bits_are_stripped_not_refused")]
                + ["tests/test_guarantees.py::test_hardlinked_members_count_toward_the_unpacked_size_limit"],
    "locks": [f"tests/test_locks.py::{t}" for t in (  # not the slow many-process races: acquire is out of SCOPES
        "test_sigkilled_holder_is_taken_over_at_once_on_same_host", "test_foreign_host_lease_waits_for_its_ttl_by_fs_clock",
        "test_holder_sees_lost_when_taken_over", "test_release_never_deletes_someone_elses_lease",
        "test_stale_guard_is_broken_fresh_guard_is_respected", "test_claim_puts_back_what_is_not_the_stale_lease",
        "test_a_container_with_the_same_host_name_is_not_judged_dead_by_pid",
        "test_lease_age_follows_the_filesystems_clock_not_this_nodes",
        "test_a_live_pid_counts_as_its_holder_only_with_its_start_time",
        "test_a_holder_that_cannot_be_inspected_counts_as_alive",
        "test_break_expired_keeps_a_lease_renewed_before_it_took_the_guard",
        "test_break_expired_without_a_lease_or_its_folder_removes_nothing",
        "test_a_link_planted_at_a_lease_name_is_an_expired_lease_of_nobody",
        "test_break_expired_judges_by_the_filesystems_clock_even_after_this_nodes_clock_jumps",
        "test_a_lease_exactly_its_ttl_old_is_still_live_and_one_gone_meanwhile_is_left_alone",
        "test_pid_1_is_judged_like_any_other_pid")]
              + ["tests/test_guarantees.py::test_a_lease_lost_after_the_download_stops_the_commit"],
    "safefs": ["tests/test_planted_links.py"],
    "xetstore": [f"tests/test_xet_store.py::{t}" for t in (
        "test_listing_whose_xet_hash_does_not_match_the_content_publishes_nothing",
        "test_base_and_finetune_share_one_stored_copy_that_huggingface_hub_accepts_and_deletes",
        "test_two_nodes_publishing_the_same_content_at_once_leave_one_entry_and_two_links")],
    "hfcache": ["tests/test_cache_commits.py"],
    "transfer.http": ["tests/test_retry_rules.py", "tests/test_guarantees.py::test_retry_after_is_waited_out",
                      "tests/test_guarantees.py::test_errors_without_a_hint_back_off"],
    "transfer.ranged": ["tests/test_retry_rules.py",
                        "tests/test_transfer.py::test_the_caller_names_the_hash_a_small_file_is_checked_with",
                        "tests/test_transfer.py::test_the_caller_names_the_hash_a_large_file_is_checked_with"],
    "offline": ["tests/test_check.py::test_a_job_environment_is_offline_whatever_the_callers_hf_variables_say",
                "tests/test_check.py::test_netns_available_says_whether_unshare_n_can_start_a_process_here",
                "tests/test_check.py::test_without_a_working_unshare_the_guard_is_used_and_nothing_is_printed",
                "tests/test_check.py::test_isolated_commands_run_the_given_python_with_the_network_off",
                "tests/test_check.py::test_the_check_process_really_has_no_network",
                "tests/test_guarantees.py::test_the_check_child_has_no_network_and_the_offline_flags"],
}
# module -> the functions/classes ("Class" or "Class.method") behind the guarantees: only mutants inside them
# run. The whole of the large modules (progress text, proxies, permissions) would take hours on 2 cores, one
# test run per mutant; a module not listed here is mutated whole.
SCOPES: dict[str, list[str]] = {
    "archive": ["clean_name", "_link_inside", "_Writer.member", "_Writer.grow", "_Writer._check_parents",
                "_Writer.hardlink", "_Writer.symlink"],
    "locks": ["_dead_local", "_stale", "Lease.held", "Lease.lost", "Lease.check", "break_expired"],
    "hfcache": ["new_hasher", "digest_file", "RepoCache.commit_blob", "RepoCache.link", "RepoCache.write_ref"],
    "transfer.http": ["RetryPolicy", "parse_retry_after", "ratelimit_wait"],
    "transfer.ranged": ["_check_content_range", "_known", "_hasher"],
    "offline": ["job_env", "netns_available", "isolated_command"],
    "xetstore": ["XetStore.publish"],
}
# Survivors that cannot change behaviour, by (module, the line as the mutant reads): run, but not counted.
EQUIVALENT: dict[tuple[str, str], str] = {
    ("archive", "for i in range(1, len(parts) << 1):"):
        "2n >= n + 1 for n >= 1 parts: the extra rounds re-check the whole name, as round n did",
    ("archive", "for i in range(1, len(parts) + 2):"): "the extra round re-checks the whole name, as round n did",
    ("archive", "if i != len(parts) and prefix in self.files:"): "i runs 1..n, so i != n is i < n",
    ("transfer.http", "if info is not None and info.remaining <= 0:"):
        "huggingface_hub parses r= as digits only: remaining is never below 0",
    ("hfcache", "fd = blobs.open(partial.name, os.O_RDONLY ^ os.O_NONBLOCK)  # a link planted meanwhile: ELOOP, not moved"):
        "O_RDONLY is 0: 0 ^ x == 0 | x",
    ("archive", "if i is not len(parts) and prefix in self.files:"): "small ints are one object: `is not` is `!=`",
    ("archive", 'if name.startswith(("/", "\\\\")) or (len(name) > 1 and name[1] is ":" and name[0].isalpha()):'):
        "one-character strings are one object each: `is` is `==`",
    ("locks", 'return abs(proc.create_time() - _num(meta, "start", proc.create_time())) >= 1.0  # pid reused'):
        "differs from > only when two float clock readings are exactly 1.0 apart",
    ("locks", "if proc.status() is psutil.STATUS_ZOMBIE:  # killed, not yet reaped: it will never heartbeat"):
        "psutil returns its own constant objects: `is` is `==`",
    ("locks", "if proc.status() >= psutil.STATUS_ZOMBIE:  # killed, not yet reaped: it will never heartbeat"):
        "no psutil status sorts after 'zombie'",
    ("locks", "with _guarded(d, name, wait= 0.0) as ok:"): "how long to wait for a busy guard: busy either way, the "
        "lease is left for the next cleanup (no outcome but time changes)",
    ("locks", "with _guarded(d, name, wait= 2.0) as ok:"): "as wait=0.0: only the time spent waiting changes",
    ("archive", "for i in range( 0, len(parts) + 1):"): "round 0 checks the empty prefix, which no member has",
    ("transfer.ranged", 'and (total.strip() is "*" or int(total) == size)'):
        "one-character strings are one object each: `is` is `==`",
    ("transfer.ranged", 'return new_hasher(algorithm >= "sha256", size)'):
        "algorithm is 'sha256' or 'git' (_known refuses any other), and 'git' sorts before",
    ("transfer.ranged", 'return new_hasher(algorithm is "sha256", size)'):
        "callers pass the literal: one interned object, `is` is `==`",
    ("hfcache", "if folder.read(ref.name, 63) == commit.encode():"):
        "a ref equal to the 40-byte commit reads the same with any bound above 40",
    ("hfcache", "os.posix_fadvise(f.fileno(), -1, 0, os.POSIX_FADV_SEQUENTIAL)"): "an advisory read-ahead hint (errors ignored)",
    ("hfcache", "os.posix_fadvise(f.fileno(), 1, 0, os.POSIX_FADV_SEQUENTIAL)"): "an advisory read-ahead hint",
    ("hfcache", "fd = blobs.open(partial.name, os.O_RDONLY + os.O_NONBLOCK)  # a link planted meanwhile: ELOOP, not moved"):
        "O_RDONLY is 0: 0 + x == 0 | x",
    ("hfcache", "except (CosmicRayTestingException, OSError):"):
        "AttributeError: only where os has no posix_fadvise (not Linux)",
    ("offline", 'if isolation is "netns":'): "callers pass the literal: one interned object, `is` is `==`",
    ("locks", "if seen is None or not _stale(seen, d, DEFAULT_TTL, fresh=False):"):
        "under the guard: the claim's own predicate (_still_stale) judges again by the filesystem's clock",
    ("offline", '_netns = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout= 11).returncode == 0'):
        "a bound on how long `unshare -n true` may take: 10 or 11 s, the same answer",
    ("offline", '_netns = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout= 9).returncode == 0'):
        "as timeout 11",
    ("offline", 'if isolation >= "netns":'): "isolation is 'netns' or 'guard', and 'guard' sorts before 'netns'",
    ("hfcache", "if folder.read(ref.name, 65) == commit.encode():"): "as 63: any bound above 40 bytes",
    ("hfcache", 'with open(path, "rb", buffering= 1) as f:'):
        "binary files cannot be line-buffered: Python warns and buffers as usual; the bytes read are the same",
    ("hfcache", "except (AttributeError, CosmicRayTestingException):"):
        "the read-ahead hint fails only on pipes; digest_file reads regular files",
    ("hfcache", "if folder.lstat(name).st_gid is not self.sharing.gid:"):
        "differs from != only by giving a link the group it already has: nothing changes",
    ("xetstore", "fd = blobs.open(partial, os.O_RDONLY ^ os.O_NONBLOCK)"): "O_RDONLY is 0: 0 ^ x == 0 | x",
    ("xetstore", "fd = blobs.open(partial, os.O_RDONLY + os.O_NONBLOCK)"): "O_RDONLY is 0: 0 + x == 0 | x",
    ("hfcache", 'with open(path, "rb", buffering= -1) as f:'): "-1 is the default buffering: the same reads",
    ("hfcache", 'h = new_hasher(algo >= "sha256", os.fstat(f.fileno()).st_size)'):
        "algo is 'sha256' or 'git', and 'git' sorts before",
    ("hfcache", 'h = new_hasher(algo is "sha256", os.fstat(f.fileno()).st_size)'):
        "callers pass the literal: one interned object, `is` is `==`",
    ("hfcache", "os.posix_fadvise(f.fileno(), 0, -1, os.POSIX_FADV_SEQUENTIAL)"): "an advisory read-ahead hint",
    ("hfcache", "os.posix_fadvise(f.fileno(), 0, 1, os.POSIX_FADV_SEQUENTIAL)"): "an advisory read-ahead hint",
    ("locks", 'pid = int(_num(meta, "pid", -1))'): "a missing pid, 0 or -1, is refused alike by `pid <= 0`",
}
WORK = REPO / "mutants"


def module_file(module: str) -> str:
    """The module's file in the checkout (`transfer.http` -> src/hpcstage/transfer/http.py)."""
    return f"src/hpcstage/{module.replace('.', '/')}.py"


def _copy(dest: Path) -> None:
    """The tracked files of the checkout as they are now (uncommitted edits included)."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())


def run(module: str, timeout: float, count_only: bool = False, again: bool = False) -> dict:
    copy = WORK / module
    session = copy / "session.sqlite"
    if again:  # keep the last run's session: only its survivors run again, with the tests as they are now
        if not session.exists():
            raise SystemExit(f"{module}: no earlier run to take the survivors from; run it without --again")
        kept, before, spent = session.read_bytes(), (copy / module_file(module)).read_text(), _seconds(copy)
    _copy(copy)
    if again:
        (copy / "seconds").write_text(f"{spent}\n")
    tests = " ".join(MODULES[module])
    config = copy / "cosmic-ray.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{module_file(module)}"\n'
        f"timeout = {timeout}\n"
        "excluded-modules = []\n"
        f'test-command = "{sys.executable} -m pytest -x -q -p no:cacheprovider -p no:randomly {tests}"\n'
        "[cosmic-ray.distributor]\n"
        'name = "local"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}  # the tests' subprocesses import the mutant too
    cr = [sys.executable, "-m", "cosmic_ray.cli"]
    started = time.monotonic()
    source = (copy / module_file(module)).read_text()
    if again:
        if source != before:
            raise SystemExit(f"{module}: {module_file(module)} changed since its last run; run it without --again")
        session.write_bytes(kept)
        db = sqlite3.connect(session)
        with db:
            db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
        db.close()
    else:
        subprocess.run([*cr, "init", str(config), str(session)], cwd=copy, env=env, check=True)
        if module in SCOPES:
            _keep_only(session, _scope_lines(source, SCOPES[module]))
        _skip_annotations(session, copy / module_file(module))
    if count_only:
        db = sqlite3.connect(session)
        n = db.execute("SELECT COUNT(*) FROM work_items WHERE job_id NOT IN (SELECT job_id FROM work_results)")
        return {"module": module, "pending": n.fetchone()[0]}
    baseline = subprocess.run([*cr, "baseline", str(config)], cwd=copy, env=env, capture_output=True, text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"{module}: the tests fail without any mutant; fix them first\n{baseline.stdout[-2000:]}")
    subprocess.run([*cr, "exec", str(config), str(session)], cwd=copy, env=env, check=True)
    seconds = round(time.monotonic() - started)
    (copy / "seconds").write_text(f"{seconds}\n" if not again else f"{_seconds(copy) + seconds}\n")
    return {"module": module, "seconds": seconds, **_results(module, session)}


def _seconds(copy: Path) -> int:
    """The time the module's last run took, its --again runs included (the copy keeps the count)."""
    try:
        return int((copy / "seconds").read_text())
    except (OSError, ValueError):
        return 0


def _scope_lines(source: str, names: list[str]) -> set[int]:
    """The source lines of the named top-level functions/classes and "Class.method"s (decorators included)."""
    import ast

    tree = ast.parse(source)
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    lines: set[int] = set()
    for name in names:
        scope, found = tree.body, None
        for part in name.split("."):
            found = next((n for n in scope if isinstance(n, defs) and n.name == part), None)
            if found is None:
                raise SystemExit(f"scripts/mutants.py: no {name} in the module; fix SCOPES")
            scope = found.body
        start = min([found.lineno, *(d.lineno for d in found.decorator_list)])
        lines.update(range(start, found.end_lineno + 1))
    return lines


def _keep_only(session: Path, lines: set[int]) -> None:
    """Remove the work items whose mutation lies outside `lines` before anything runs."""
    db = sqlite3.connect(session)
    with db:
        rows = db.execute("SELECT job_id, start_pos_row FROM mutation_specs").fetchall()
        gone = [(job,) for job, row in rows if row not in lines]
        for table in ("work_results", "mutation_specs", "work_items"):
            db.executemany(f"DELETE FROM {table} WHERE job_id = ?", gone)
    db.close()


def _annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) (line, column) of every type annotation: with `from __future__ import annotations` they
    are never evaluated, so a mutant there (`str | None` -> `str // None`) cannot change behaviour."""
    import ast

    spans = []
    for node in ast.walk(ast.parse(source)):
        found = []
        if isinstance(node, ast.arg) and node.annotation is not None:
            found.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
        spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in found]
    return spans


def _skip_annotations(session: Path, module: Path) -> None:
    """Mark the mutants inside type annotations as skipped (cosmic-ray's own filters do not know them)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    spans = _annotation_spans(module.read_text())
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in db.work_items:
            for spec in item.mutations:
                at = tuple(spec.start_pos)
                if any(a <= at < b for a, b in spans):
                    db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
                    break


def _results(module: str, session: Path) -> dict:
    db = sqlite3.connect(session)
    rows = db.execute(
        "SELECT m.module_path, m.operator_name, m.start_pos_row, r.test_outcome, r.diff FROM mutation_specs m "
        "JOIN work_results r ON r.job_id = m.job_id"
    ).fetchall()
    equivalent = [row for row in rows if row[3] == "SURVIVED" and any(
        (module, line[1:].strip()) in EQUIVALENT for line in (row[4] or "").splitlines()
        if line.startswith("+") and not line.startswith("+++"))]
    rows = [row for row in rows if row not in equivalent]
    outcomes = [(p, op, row, (outcome or "").lower()) for p, op, row, outcome, _ in rows if outcome]  # skipped: None
    survived = [f"{Path(p).name}:{row} {op.split('/')[-1]}" for p, op, row, outcome in outcomes if outcome == "survived"]
    killed = sum(1 for *_, outcome in outcomes if outcome in ("killed", "incompetent"))
    return {"mutants": len(outcomes), "killed": killed, "skipped": len(rows) - len(outcomes),
            "equivalent": len(equivalent), "survived": sorted(survived)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--list", action="store_true", help="only count the mutants in scope per module")
    parser.add_argument("--again", action="store_true",
                        help="run only the last run's survivors again (after adding tests; the module unchanged)")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: write the report from the modules' last runs (known equivalents as now)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run")
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module {', '.join(unknown)}; pick from {', '.join(MODULES)}")
    args.modules = args.modules or list(MODULES)
    WORK.mkdir(exist_ok=True)
    if args.list:
        for module in args.modules:
            print(f"{module}: {run(module, args.timeout, count_only=True)['pending']} mutants to run", flush=True)
        return
    results = []
    for module in args.modules:
        if args.report:
            if not (WORK / module / "session.sqlite").exists():
                continue
            r = {"module": module, "seconds": _seconds(WORK / module), **_results(module, WORK / module / "session.sqlite")}
        else:
            r = run(module, args.timeout, again=args.again)
        results.append(r)
        ratio = r["killed"] / r["mutants"] if r["mutants"] else 1.0
        print(f"{module}: {r['killed']}/{r['mutants']} killed ({ratio:.0%}) in {r['seconds']} s; "
              f"{r['equivalent']} known equivalent not counted", flush=True)
        for s in r["survived"]:
            print(f"  survived: {s}")
    total = sum(r["mutants"] for r in results)
    killed = sum(r["killed"] for r in results)
    lines = ["# Mutation testing (`make mutants`)", "", "| module | killed | mutants | ratio | equivalent | time |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['module']} | {r['killed']} | {r['mutants']} | {r['killed'] / max(1, r['mutants']):.0%} | "
              f"{r['equivalent']} | {r['seconds']} s |" for r in results]
    lines += ["", f"All: {killed}/{total} ({killed / max(1, total):.0%})", "", "Survivors:", ""]
    lines += [f"- {r['module']}: {s}" for r in results for s in r["survived"]]
    lines += ["", "Known equivalent, not counted: see EQUIVALENT in scripts/mutants.py for each one's reason."]
    (WORK / "report.md").write_text("\n".join(lines) + "\n")
    (WORK / "report.json").write_text(json.dumps(results, indent=1))
    print(f"all: {killed}/{total} killed ({killed / max(1, total):.0%}); report in {WORK / 'report.md'}")


if __name__ == "__main__":
    main()
