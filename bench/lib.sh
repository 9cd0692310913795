# bench/lib.sh: helpers of the project's own bench scripts (bench/peer/lib.sh
# belongs to the peer harness, kept in step with ../shared/bench).

# cpu_ticks PID: utime + stime of PID (all its threads) and of its children
# (nginx's workers), in clock ticks; 0 for a process that is gone. Read past
# the command name, which may hold spaces.
cpu_ticks() {
  local pid sum=0 t
  for pid in "$1" $(pgrep -P "$1"); do
    t=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }') || continue
    sum=$((sum + ${t:-0}))
  done
  echo "$sum"
}
