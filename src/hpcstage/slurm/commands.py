"""The `launch` and `clusters` subcommands: argument parsing and printing only (cli.py wires them in)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hpcstage.errors import BadInput


def add_launch_parser(sub) -> None:
    from hpcstage.slurm import JOB_TYPES

    p = sub.add_parser(
        "launch",
        help="render, stage for and submit a Slurm job (train, datagen, consolidate, eval, run)",
        description="Render a batch script for a job type, stage what it names when compute nodes "
        "are offline, record everything in EXPERIMENTS_DIR/NAME/ and submit it.",
    )
    p.add_argument("--job-type", required=True, choices=JOB_TYPES)
    g = p.add_argument_group("cluster and Slurm")
    g.add_argument("--cluster", help="registry name (default: detected; see `hpcstage clusters`)")
    g.add_argument("--partition", help="override the registry's partition")
    g.add_argument("--account", help="override the registry's account")
    g.add_argument("--num-nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, help="default: all for train/eval/datagen, none for run/consolidate")
    g.add_argument("--cpus-per-task", type=int, help="default: the node's CPUs per GPU asked for")
    g.add_argument("--time-limit", help="Slurm time, e.g. 12:00:00 (default: the partition's longest)")
    g.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="JOBID|EXPERIMENT",
        help="start after this job (or this experiment folder's last job) succeeds",
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="queue N more attempts, each run only if the one before failed",
    )
    g = p.add_argument_group("experiment")
    g.add_argument("--experiments-dir", type=Path, default=Path("experiments"), help="default ./experiments")
    g.add_argument("--name", help="experiment folder name (default: JOBTYPE-DATE-TIME)")
    g.add_argument("--templates", type=Path, metavar="DIR", help="folder of *.sbatch.j2 overriding the bundled ones")
    g.add_argument(
        "--python",
        help="interpreter jobs run Python tools with (default: registry, else the "
        "activated environment's python, else this one)",
    )
    g.add_argument(
        "--activate",
        metavar="LINE",
        help="shell line entering the jobs' environment, run after the "
        "module loads (replaces the registry's `activate`), e.g. 'source ~/venvs/x/bin/activate'",
    )
    g.add_argument(
        "--env-file",
        action="append",
        default=[],
        metavar="FILE",
        help="KEY=value lines exported into the jobs (not secrets: copied into the script and config.json)",
    )
    g.add_argument("--dry-run", action="store_true", help="write and print everything; stage and submit nothing")
    g = p.add_argument_group("models, data and staging")
    g.add_argument("-f", "--manifest", type=Path, help="stage this manifest's entries for the job")
    g.add_argument("--model", help="Hub repo id or local path ($HPCSTAGE_MODEL in the job)")
    g.add_argument("--dataset", help="Hub repo id or local path ($HPCSTAGE_DATASET in the job)")
    g.add_argument("--cache-dir", type=Path, help="hub cache folder (default: manifest, else HF_HUB_CACHE rules)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--offline",
        dest="offline",
        action="store_const",
        const=True,
        help="compute nodes have no internet (default: the registry says)",
    )
    mode.add_argument("--online", dest="offline", action="store_const", const=False)
    g.add_argument(
        "--no-stage", dest="stage", action="store_false", help="do not pull; refuse unless everything is staged already"
    )
    g = p.add_argument_group("train (llama-factory) and eval")
    g.add_argument("--train-config", type=Path, metavar="YAML")
    g.add_argument("--train-command", help="replaces `llamafactory-cli train` (gets the config and overrides)")
    g.add_argument(
        "--train-extra-args",
        metavar="ARGS",
        help="more llama-factory overrides as key=value words, e.g. 'learning_rate=1e-5 num_train_epochs=1'",
    )
    g.add_argument("--eval-tasks", metavar="A,B", help="eval job: lm_eval tasks; with train, chained afterok")
    g.add_argument("--eval-command", help="replaces `$HPCSTAGE_PYTHON -m lm_eval`")
    g.add_argument("--eval-gpus", type=int, metavar="N", help="GPUs of the eval job (default 1)")
    g.add_argument(
        "--eval-time-limit",
        metavar="TIME",
        help="time limit of the eval job (default 04:00:00, capped at the partition's limit)",
    )
    g = p.add_argument_group("datagen")
    g.add_argument(
        "--datagen-script",
        type=Path,
        help="run as $HPCSTAGE_PYTHON SCRIPT [--engine E] [ARGS]; an array "
        "task finds its task folders listed in $HPCSTAGE_CHUNK_LIST",
    )
    g.add_argument("--datagen-extra-args", metavar="ARGS")
    g.add_argument("--datagen-engine", help="passed to the script as --engine")
    g.add_argument("--trace-input-path", type=Path, metavar="DIR", help="folder of task folders to split in chunks")
    g.add_argument("--chunk-size", type=int, metavar="N", help="task folders per array task")
    g.add_argument("--max-parallel", type=int, metavar="M", help="array tasks running at once (%%M)")
    g.add_argument(
        "--datagen-target-repo",
        metavar="ORG/NAME",
        help="upload $HPCSTAGE_OUTPUT_DIR to this dataset "
        "repo at the end of the job (arrays: ORG/NAME-chunk-<i>); token: HF_TOKEN of the secrets file",
    )
    g = p.add_argument_group("consolidate and run")
    g.add_argument("--checkpoint-dir", type=Path, help="consolidate: the ZeRO checkpoint folder")
    g.add_argument("--command", help='run: the shell command, e.g. "python eval.py --x 1"')
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the jobs until they end (exit 0 if all completed); give up on a job that can never "
        "start (PartitionTimeLimit, DependencyNeverSatisfied...)",
    )
    p.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print jobs.json on stdout")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_launch)


def cmd_launch(args: argparse.Namespace) -> int:
    from hpcstage.slurm.launch import launch, make_request

    request = make_request(
        args.job_type,
        cluster=args.cluster,
        partition=args.partition,
        account=args.account,
        experiments_dir=args.experiments_dir,
        name=args.name,
        after=args.after,
        max_restarts=args.max_restarts,
        dry_run=args.dry_run,
        offline=args.offline,
        manifest=args.manifest,
        model=args.model,
        dataset=args.dataset,
        stage=args.stage,
        templates=args.templates,
        cache_dir=args.cache_dir,
        python=args.python,
        num_nodes=args.num_nodes,
        time_limit=args.time_limit,
        gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        quiet=args.quiet or args.json,
        train_config=args.train_config,
        train_command=args.train_command,
        train_extra_args=args.train_extra_args,
        eval_tasks=[t for t in (args.eval_tasks or "").split(",") if t],
        eval_command=args.eval_command,
        eval_gpus=args.eval_gpus,
        eval_time_limit=args.eval_time_limit,
        datagen_script=args.datagen_script,
        datagen_extra_args=args.datagen_extra_args,
        datagen_engine=args.datagen_engine,
        trace_input_path=args.trace_input_path,
        chunk_size=args.chunk_size,
        max_parallel=args.max_parallel,
        checkpoint_dir=args.checkpoint_dir,
        command=args.command,
        activate=args.activate,
        env_files=[str(f) for f in args.env_file],
        datagen_target_repo=args.datagen_target_repo,
    )
    if args.wait and args.dry_run:
        raise BadInput("--wait follows submitted jobs; a --dry-run submits none")
    result = launch(request)
    exp = result.experiment_dir
    for warning in result.warnings:
        print(f"hpcstage: warning: {warning}", file=sys.stderr)
    if args.json:
        print((exp / "jobs.json").read_text(), end="")
        return _follow(result, args.poll, quiet=True) if args.wait else 0
    if args.quiet:
        return _follow(result, args.poll, quiet=True) if args.wait else 0
    print(
        f"cluster {result.cluster.name} ({'offline' if result.offline else 'online'} compute nodes); experiment {exp}"
    )
    for a in result.artifacts:
        where = f" -> {a.path}" if a.path else ""
        print(f"  {a.role} {a.source}{'@' + a.revision if a.revision else ''}: {a.state}{where}")
    for job in result.jobs:
        if result.dry_run and job.script is not None:
            print(f"\n--- {job.script}")
            print(job.script.read_text(), end="")
        for argv in job.sbatch:
            print(("would run: " if result.dry_run else "ran: ") + " ".join(argv))
    if result.dry_run:
        print(f"\ndry run: nothing staged or submitted; records in {exp}/jobs.json and config.json")
    else:
        ids = ", ".join(f"{job.key} {'/'.join(job.ids)}" for job in result.jobs)
        print(f"submitted {ids}; `hpcstage status --experiment {exp}`", flush=True)
        if args.wait:
            return _follow(result, args.poll, quiet=False)
    return 0


def _follow(result, poll: float, quiet: bool) -> int:
    """--wait: print each job's state (and why it waits) as it changes; 0 once all completed."""
    from hpcstage.slurm.jobs import belongs, wait

    ids = [i for job in result.jobs for i in job.ids]
    seen: dict[str, str] = {}

    def show(states) -> None:
        for s in sorted(states.values(), key=lambda s: (len(s.job_id), s.job_id)):
            line = f"{s.state}{f' ({s.reason})' if s.reason else ''}"
            if seen.get(s.job_id) != line and not quiet:
                print(f"job {s.job_id}: {line}", flush=True)
            seen[s.job_id] = line

    states = wait(ids, timeout=float("inf"), poll=poll, on_poll=show)
    stuck = [s for s in states.values() if s.never_runs]
    if stuck:
        print(f"hpcstage: error: {stuck[0].why_never()}", file=sys.stderr)
        return 1
    bad = []
    for job in result.jobs:  # a job succeeded when one attempt completed (every task, for an array)
        attempts = {i: [s for s in states.values() if belongs(s, i)] for i in job.ids}
        mine = [s for found in attempts.values() for s in found]
        if not any(found and all(s.state == "COMPLETED" for s in found) for found in attempts.values()):
            bad.append(f"{job.key} ({', '.join(f'{s.job_id} {s.state}' for s in mine)})")
    if bad:
        print(
            f"hpcstage: error: not completed: {'; '.join(bad)}; `hpcstage status --experiment {result.experiment_dir}`",
            file=sys.stderr,
        )
        return 1
    return 0


def add_clusters_parser(sub) -> None:
    p = sub.add_parser("clusters", help="the cluster registry: list, detect this one, show what one accepts")
    p.add_argument("action", nargs="?", choices=["list", "detect", "show"], default="list")
    p.add_argument("name", nargs="?", help="with `show`: the cluster")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_clusters)


def cmd_clusters(args: argparse.Namespace) -> int:
    from hpcstage.slurm.clusters import RegistryError, detect, load_registry

    try:
        registry = load_registry()
        if args.action == "show":
            if not args.name:
                raise BadInput(f"`clusters show NAME`: known clusters: {', '.join(registry.names())}")
            return _show(registry.get(args.name), args.json)
        if args.name:
            raise BadInput(f"`clusters {args.action}` takes no name; did you mean `clusters show {args.name}`?")
        here = detect(registry=registry)
    except RegistryError as e:
        raise BadInput(str(e)) from None
    if args.action == "detect":
        if here is None:
            print("no known cluster matches this machine; pass --cluster NAME to launch", flush=True)
            return 1
        print(json.dumps({"cluster": here.name}) if args.json else here.name)
        return 0
    if args.json:
        print(json.dumps([c.model_dump() for c in registry], indent=1))
        return 0
    rows = [("", "NAME", "INTERNET", "GPUS", "GPU TYPE", "PARTITION", "MAX TIME")]
    for c in sorted(registry, key=lambda c: c.name):
        rows.append(
            (
                "*" if here and c.name == here.name else "",
                c.name,
                "yes" if c.internet else "no",
                str(c.gpus_per_node),
                c.gpu_type,
                c.partition or "-",
                c.max_time,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)).rstrip())
    print(f"(* = this machine; registry from {', '.join(registry.sources)})")
    return 0


def _show(cluster, as_json: bool) -> int:
    data = cluster.model_dump()
    if as_json:
        print(json.dumps({**data, "sbatch_options": cluster.sbatch_options()}, indent=1))
        return 0
    for key, value in data.items():
        if value not in (None, [], {}):
            print(f"{key:14} {value}")
    print(f"{'sbatch':14} {' '.join(cluster.sbatch_options())}  (all GPUs of one node)")
    gpus = f"0-{cluster.gpus_per_node}" if cluster.gpu_directive != "none" else f"whole nodes ({cluster.gpus_per_node})"
    print(
        f"{'accepts':14} --gpus-per-node {gpus}; --cpus-per-task 1-{cluster.cpus_per_node}; "
        f"--time-limit up to {cluster.max_time}; stages before launch: {'no' if cluster.internet else 'yes'}"
    )
    return 0
