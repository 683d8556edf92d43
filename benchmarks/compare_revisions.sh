#!/bin/bash
# Runs one harness phase (a config.json from a harness run's directory) at several git
# revisions, alternately, ROUNDS times, and prints each run's wall time, CPU-seconds, first
# output, tail and the processes that used the most CPU. For A/B comparisons of a change on a
# shared host, where back-to-back alternation cancels most of the drift.
#
#   benchmarks/compare_revisions.sh build/bench/runs/<stamp>/trivial-rayseg-full/config.json 3 05f7f7a HEAD
#
# Each revision is checked out as a git worktree under build/compare/ and imported from
# there (PYTHONPATH), by the driver and by every Ray worker, with this checkout's .venv.
set -euo pipefail
config=$(realpath "$1"); rounds=$2; shift 2
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
work="$repo/build/compare"
mkdir -p "$work"
revisions=()
for rev in "$@"; do
  sha=$(git -C "$repo" rev-parse --short "$rev")
  revisions+=("$sha")
  if [ ! -d "$work/tree-$sha" ]; then
    git -C "$repo" worktree add -f --detach "$work/tree-$sha" "$sha" >/dev/null
    # The repository root is the package: a directory holding a `rayseg` link makes it importable.
    mkdir -p "$work/path-$sha" && ln -sfn "$work/tree-$sha" "$work/path-$sha/rayseg"
  fi
done
for round in $(seq "$rounds"); do
  for sha in "${revisions[@]}"; do
    out="$work/run-$sha-$round"
    rm -rf "$out" && mkdir -p "$out"
    "$repo/.venv/bin/python" -c "import json, sys; c = json.load(open(sys.argv[1])); c['output'] = sys.argv[2]; json.dump(c, open(sys.argv[3], 'w'))" \
      "$config" "$out/output" "$out/config.json"
    (cd "$work/tree-$sha" && PYTHONPATH="$work/path-$sha:$work/tree-$sha" OMP_WAIT_POLICY=PASSIVE \
      "$repo/.venv/bin/python" -m benchmarks.harness_phases "$out/config.json" "$out/result.json" > "$out/log.txt" 2>&1)
    "$repo/.venv/bin/python" -c "
import json, sys
r = json.load(open(sys.argv[1]))
top = sorted(r['by_process_cpu_s'].items(), key=lambda kv: -kv[1])[:4]
print(sys.argv[2], sys.argv[3], 'wall %.2f s, CPU %.2f s, first output %.2f s, tail %.2f s;' % (r['wall_s'], r['cpu_s'], r['first_output_s'], r['tail_s']),
      ', '.join('%s %.2f' % kv for kv in top))
" "$out/result.json" "$sha" "$round"
  done
done
