# Shared by scripts/swarm-fixture and scripts/private-dockerd: stopping daemons
# by pidfile, cleaning what a killed daemon leaves, loading the local test
# images. Sourced, never run; every function is prefixed `fx_`.
#
# Invariants:
# - A pid is signalled only when /proc/PID/cmdline names the caller's state
#   directory (a recycled pid is never ours).
# - Images are copied from the main daemon (read only) and loaded into a
#   target only when the target's image id differs.

FX_IMAGES=(roost-mimic:latest roost-busybox:latest)

# The pid in PIDFILE when that process lives and its command line contains
# MARKER; else nothing.
fx_owned_pid() {
    local pidfile=$1 marker=$2 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$marker"; then
        echo "$pid"
    fi
}

# True while PID runs. A zombie counts as gone: PID 1 here reaps orphans
# late (a second or more), and `kill -0` succeeds on a zombie.
fx_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ] && [ "${stat%% *}" != X ]
}

fx_wait_all() {
    local pid status=0
    for pid in "$@"; do
        wait "$pid" || status=1
    done
    return "$status"
}

# Stop dockerd processes given as PID:LOG pairs: SIGTERM to all, then wait
# until each is gone. dockerd logs "Daemon shutdown complete" (about 1 s after
# SIGTERM here) and may then linger for seconds redialling its containerd,
# which is already gone: once the line is in the log the daemon is SIGKILLed.
# SIGKILL too for any daemon still running after TIMEOUT seconds.
fx_stop_dockerds() {
    local timeout=$1 pair pid log deadline
    shift
    local -A offsets=()
    for pair in "$@"; do
        pid=${pair%%:*}
        log=${pair#*:}
        offsets[$pid]=$(stat -c %s "$log" 2>/dev/null || echo 0)
        kill -TERM "$pid" 2>/dev/null || true
    done
    deadline=$((SECONDS + timeout))
    for pair in "$@"; do
        pid=${pair%%:*}
        log=${pair#*:}
        while fx_alive "$pid"; do
            if tail -c "+$((offsets[$pid] + 1))" "$log" 2>/dev/null | grep -q "Daemon shutdown complete"; then
                kill -KILL "$pid" 2>/dev/null || true
            elif [ "$SECONDS" -ge "$deadline" ]; then
                echo "dockerd $pid still running after ${timeout} s; killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.05
        done
    done
}

# True when the daemon behind SOCKET answers.
fx_answers() { timeout 5 docker -H "unix://$1" version >/dev/null 2>&1; }

# Wait up to TIMEOUT s for SOCKET to answer; on failure, or as soon as the
# daemon's process PID (optional) has exited, print LOG's tail and fail.
fx_wait_answers() {
    local socket=$1 timeout=$2 log=$3 pid=${4:-} deadline
    deadline=$((SECONDS + timeout))
    until fx_answers "$socket"; do
        if [ -n "$pid" ] && ! fx_alive "$pid"; then
            echo "error: the daemon for $socket exited; $log tail:" >&2
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "error: the daemon on $socket did not answer within ${timeout} s; $log tail:" >&2
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        sleep 0.1
    done
}

# Remove every container of the daemon behind SOCKET (SIGKILL): a daemon that
# stops running containers waits out each one's stop timeout.
fx_remove_containers() {
    local socket=$1 ids
    fx_answers "$socket" || return 0
    ids=$(timeout 30 docker -H "unix://$socket" ps -aq 2>/dev/null || true)
    [ -z "$ids" ] || timeout 60 docker -H "unix://$socket" rm -f $ids >/dev/null 2>&1 || true
}

# SIGKILL every process in the cgroup subtree PARENT (containers a killed
# daemon left running), then every process whose command line contains MARKER
# (containerd, shims), except this script and its callers.
fx_kill_strays() {
    local parent=$1 marker=$2 controller procs pid
    for controller in /sys/fs/cgroup/pids /sys/fs/cgroup/unified; do
        [ -d "$controller/$parent" ] || continue
        procs=$(find "$controller/$parent" -name cgroup.procs -exec cat {} + 2>/dev/null || true)
        [ -z "$procs" ] || kill -KILL $procs 2>/dev/null || true
    done
    for pid in $(pgrep -f -- "$marker" || true); do
        [ "$pid" != "$$" ] || continue
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE "swarm-fixture|private-dockerd" && continue
        kill -KILL "$pid" 2>/dev/null || true
    done
}

# Lazily unmount everything mounted under DIR, deepest first.
fx_unmount_under() {
    local dir=$1 mount
    { grep -F " $dir/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r |
        while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
}

# Remove the cgroup directory PARENT (a --cgroup-parent) in every hierarchy,
# depth first; a directory still holding a process stays.
fx_remove_cgroups() {
    local parent=$1 controller
    for controller in /sys/fs/cgroup/*/; do
        [ -d "$controller$parent" ] || continue
        find "$controller$parent" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
}

# Lines naming what is left of a daemon: processes whose command line contains
# MARKER, mounts under DIR, cgroup directories PARENT.
fx_leftovers() {
    local dir=$1 marker=$2 parent=$3 controller
    { pgrep -af -- "$marker" || true; } | grep -vE "swarm-fixture|private-dockerd|pgrep" |
        sed 's/^/process /' || true
    { grep -F " $dir/" /proc/self/mountinfo || true; } | awk '{print "mount " $5}'
    for controller in /sys/fs/cgroup/*/; do
        [ ! -d "$controller$parent" ] || echo "cgroup $controller$parent"
    done
}

# Load FX_IMAGES from the main daemon into every daemon behind SOCKETS, in
# parallel, skipping a daemon that already has the same image id. Saved
# tarballs are kept in CACHE_DIR (one per image id) for the next load.
# Prints what it did.
fx_load_images() {
    local cache=$1 image image_id tar socket pids=() loaded=()
    shift
    mkdir -p "$cache"
    for image in "${FX_IMAGES[@]}"; do
        image_id=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null) || {
            echo "error: image $image missing on the main daemon; run scripts/build-images" >&2
            return 1
        }
        tar="$cache/${image_id#sha256:}.tar"
        for socket in "$@"; do
            if [ "$(timeout 30 docker -H "unix://$socket" image inspect --format '{{.Id}}' "$image" 2>/dev/null)" = "$image_id" ]; then
                continue
            fi
            if [ ! -s "$tar" ]; then
                docker save "$image" -o "$tar.partial"
                mv "$tar.partial" "$tar"
            fi
            timeout 300 docker -H "unix://$socket" load -q -i "$tar" >/dev/null &
            pids+=($!)
            loaded+=("$image")
        done
        if [ "${#pids[@]}" -gt 0 ]; then
            fx_wait_all "${pids[@]}" || {
                echo "error: docker load of $image failed" >&2
                return 1
            }
        fi
        pids=()
    done
    # Tarballs of image ids no longer current are dead weight.
    local keep=() file
    for image in "${FX_IMAGES[@]}"; do
        keep+=("$cache/$(docker image inspect --format '{{.Id}}' "$image" | cut -d: -f2).tar")
    done
    for file in "$cache"/*.tar; do
        [ -e "$file" ] || continue
        [[ " ${keep[*]} " == *" $file "* ]] || rm -f "$file"
    done
    if [ "${#loaded[@]}" -gt 0 ]; then
        echo "loaded ${#loaded[@]} image copies ($(printf '%s\n' "${loaded[@]}" | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}'))"
    else
        echo "images cached"
    fi
}
