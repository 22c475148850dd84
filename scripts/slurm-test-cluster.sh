#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for hpcstage's tests.
#
#   slurm-test-cluster.sh start    install if needed, configure, start, wait until the node is idle
#   slurm-test-cluster.sh stop     stop the daemons this script started
#   slurm-test-cluster.sh status   print the node state; exit 0 only when jobs can run
#
# No systemd here: munged, slurmctld and slurmd are started directly and tracked by pid files
# that are checked against /proc, so stale files (e.g. from a previous boot) are harmless.
# The node advertises 8 CPUs, 64 GB and 4 fake GPUs (character devices outside /dev), whatever
# the machine has, so arrays, dependencies and --gres=gpu:N behave as on a real site.
# Config in /etc/slurm, state in /var/lib/slurm-test, logs in /var/log/slurm-test.
# SLURM_TEST_START_TIMEOUT (default 60 s) bounds the wait for the node.
set -euo pipefail

readonly CLUSTER=hpcstage
readonly NODE=node1
readonly CONF_DIR=/etc/slurm
readonly STATE_DIR=/var/lib/slurm-test
readonly LOG_DIR=/var/log/slurm-test
readonly RUN_DIR=/run/slurm-test
readonly GPU_DIR=$STATE_DIR/gpu
readonly OWNER="hpcstage scripts/slurm-test-cluster.sh"
readonly MARKER="# Written by $OWNER: the next start overwrites edits."
readonly START_TIMEOUT=${SLURM_TEST_START_TIMEOUT:-60}
readonly PACKAGES=(slurmctld slurmd slurm-client munge)

T0=${EPOCHREALTIME/[.,]/}
say() {
    local us=$((${EPOCHREALTIME/[.,]/} - T0))
    printf '[slurm-test-cluster %3d.%02ds] %s\n' $((us / 1000000)) $((us % 1000000 / 10000)) "$*"
}
die() { printf 'slurm-test-cluster: error: %s\n' "$*" >&2; exit 1; }

require_root() {
    [[ $EUID -eq 0 ]] || die "'$1' must run as root (it installs packages, writes $CONF_DIR and starts daemons); try: sudo $0 $1"
}

# proc_state PID: print "NAME STATE" from /proc/PID/stat (e.g. "slurmd S").
proc_state() {
    local stat
    read -r stat 2>/dev/null </proc/"$1"/stat || return 1
    [[ $stat =~ ^[0-9]+\ \((.*)\)\ ([A-Za-z]) ]] || return 1
    echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]}"
}

# pid_of NAME PIDFILE: print the pid if PIDFILE names a live process called NAME. Nothing here
# reaps daemons that exit, so a zombie counts as gone.
pid_of() {
    local pid state
    [[ -r $2 ]] || return 1
    pid=$(tr -dc '0-9' <"$2")
    [[ -n $pid ]] && state=$(proc_state "$pid") || return 1
    [[ $state == "$1 "[^Z] ]] || return 1
    echo "$pid"
}

install_packages() {
    local missing=() cmd
    for cmd in slurmctld slurmd sinfo munged; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
    say "installed"
}

write_if_changed() {  # write_if_changed PATH CONTENT: return 0 if the file changed
    if [[ -f $1 ]] && [[ $(<"$1") == "$2" ]]; then return 1; fi
    printf '%s\n' "$2" >"$1"
}

CONFIG_CHANGED=0
configure() {  # sets CONFIG_CHANGED=1 when slurm.conf or gres.conf changed
    local host
    host=$(hostname -s)
    if [[ -f $CONF_DIR/slurm.conf ]] && ! head -n 1 "$CONF_DIR/slurm.conf" | grep -qF "$OWNER"; then
        die "$CONF_DIR/slurm.conf exists and was not written by this script; move it away first"
    fi
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d" "$LOG_DIR" "$RUN_DIR" "$GPU_DIR"
    local i
    for i in 0 1 2 3; do
        [[ -c $GPU_DIR/nvidia$i ]] || { rm -f "$GPU_DIR/nvidia$i"; mknod -m 666 "$GPU_DIR/nvidia$i" c 1 3; }
    done
    write_if_changed "$CONF_DIR/slurm.conf" "$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups in containers: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Advertise the node below, not what the hardware has.
SlurmdParameters=config_overrides
# Schedule at once: a trivial job goes from sbatch to COMPLETED in about a second.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
# No slurmdbd: finished jobs are read back with 'sacct -c' from this file.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
GresTypes=gpu
ReturnToService=2
MpiDefault=none
KillWait=2
InactiveLimit=0
NodeName=$NODE NodeHostname=$host NodeAddr=127.0.0.1 CPUs=8 RealMemory=64000 Gres=gpu:4 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=$NODE MaxTime=00:10:00 State=UP" && CONFIG_CHANGED=1
    write_if_changed "$CONF_DIR/gres.conf" "$MARKER
AutoDetect=off
NodeName=$NODE Name=gpu File=$GPU_DIR/nvidia[0-3]" && CONFIG_CHANGED=1
    return 0
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    # --force: a socket left by a munged that died (or a previous boot) is not a reason to stop.
    runuser -u munge -- /usr/sbin/munged --force 2>>"$LOG_DIR/munged.stderr" \
        || { tail -n 20 "$LOG_DIR/munged.stderr" /var/log/munge/munged.log 2>/dev/null >&2; die "munged failed to start"; }
}

# start_daemon NAME ARGS...: start a Slurm daemon unless its pid file names a live one.
start_daemon() {
    local name=$1; shift
    pid_of "$name" "$RUN_DIR/$name.pid" >/dev/null && return 0
    rm -f "$RUN_DIR/$name.pid"
    "$name" "$@" 2>>"$LOG_DIR/$name.stderr" \
        || { show_logs; die "$name failed to start"; }
}

# stop_daemons NAME:PIDFILE...: SIGTERM all at once (each takes a while to save its state),
# then wait for each, SIGKILL after 10 s.
stop_daemons() {
    local spec name file pid i n pids=() names=()
    for spec in "$@"; do
        name=${spec%%:*} file=${spec#*:}
        if pid=$(pid_of "$name" "$file"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid") names+=("$name")
        fi
        rm -f "$file"
    done
    for i in "${!pids[@]}"; do
        pid=${pids[$i]}
        for ((n = 0; n < 100; n++)); do
            [[ $(proc_state "$pid") == *\ [^Z] ]] || break  # gone, or a zombie
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
        say "stopped ${names[$i]} (pid $pid)"
    done
}

node_state() { timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n 1; }

show_logs() {
    local f
    for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd.log "$LOG_DIR"/*.stderr; do
        [[ -s $f ]] && { echo "--- tail $f" >&2; tail -n 15 "$f" >&2; }
    done
    return 0
}

wait_until_usable() {
    local deadline state=""
    deadline=$(($(date +%s) + START_TIMEOUT))
    while (($(date +%s) < deadline)); do
        pid_of slurmctld "$RUN_DIR/slurmctld.pid" >/dev/null \
            || { show_logs; die "slurmctld exited (logs above, in $LOG_DIR)"; }
        state=$(node_state || true)
        case $state in
        idle | mix | alloc | comp) return 0 ;;
        drain* | drng* | down | fail*)
            # A drained node stays drained across restarts until told otherwise.
            say "node $NODE is '$state': resuming it"
            scontrol update nodename="$NODE" state=resume 2>/dev/null || true
            ;;
        esac
        sleep 0.5
    done
    show_logs
    die "node $NODE not usable after ${START_TIMEOUT}s (last state: '${state:-no answer from slurmctld}')"
}

cmd_start() {
    require_root start
    install_packages
    configure
    if ((CONFIG_CHANGED)); then
        say "configuration written to $CONF_DIR; restarting daemons"
        stop_daemons "slurmd:$RUN_DIR/slurmd.pid" "slurmctld:$RUN_DIR/slurmctld.pid"
    fi
    start_munge
    start_daemon slurmctld
    start_daemon slurmd -N "$NODE"
    say "daemons running (logs in $LOG_DIR)"
    wait_until_usable
    say "node $NODE is $(node_state): cluster '$CLUSTER' ready"
}

cmd_stop() {
    require_root stop
    stop_daemons "slurmd:$RUN_DIR/slurmd.pid" "slurmctld:$RUN_DIR/slurmctld.pid" \
        munged:/run/munge/munged.pid
    say "stopped"
}

cmd_status() {
    local state="" name pid
    command -v sinfo >/dev/null || { echo "slurm-test-cluster: Slurm is not installed"; return 3; }
    for name in slurmctld slurmd; do
        pid=$(pid_of "$name" "$RUN_DIR/$name.pid") || pid="not running"
        echo "$name: $pid"
    done
    # Without slurmctld, sinfo would spend seconds retrying.
    if pid_of slurmctld "$RUN_DIR/slurmctld.pid" >/dev/null; then state=$(node_state || true); fi
    echo "node $NODE: ${state:-unknown (no answer from slurmctld)}"
    case $state in
    idle | mix | alloc | comp) return 0 ;;
    *) return 1 ;;
    esac
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
