#!/usr/bin/env bash
# Stop only the daemons setup_slurm.sh started (recorded in $STATE/started).
STATE=${SLURM_TEST_STATE:-/tmp/neox-mlc-slurm}
[ -f "$STATE/started" ] || exit 0
tac "$STATE/started" | while read -r daemon; do
  [ -n "$daemon" ] && pkill -x "$daemon" 2>/dev/null || true
done
: > "$STATE/started"
