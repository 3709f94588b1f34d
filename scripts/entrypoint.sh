#!/bin/sh
# The worker image's entrypoint, run by tini (PID 1: it reaps orphans and passes SIGTERM
# and SIGINT on to this script).
#
# Prefect's Kubernetes and Docker workers run `prefect flow-run execute`, which starts the
# flow run as its child process and reports its end. A container stop (a pod deleted or
# evicted, a node drained, `docker stop`) must stop that flow run as Prefect's own
# cancellation does, with SIGTERM to the flow-run process alone, so it commits what it
# generated and releases its claims (README, "Stops and cancellation"), while the executor
# lives on to report it:
# - PID 1 gets no signal it has no handler for, so the executor as PID 1 would sleep
#   through the stop until the SIGKILL at the end of the grace;
# - the executor itself dies on SIGTERM, and the container, with the flow run, ends with it;
# - SIGTERM to the process group (`tini -g`) reaches the engine's processes too: they exit
#   at once, and the commit waits for vLLM to notice (benchmarks/clean_stop.py, `group`).
# So the executor runs as a child of this script, which passes SIGTERM and SIGINT to the
# executor's children only. Any other command replaces this script and gets the signals.
set -eu

case "$*" in
  "prefect flow-run execute"*) ;;
  *) exec "$@" ;;
esac

"$@" &
executor=$!
trap 'pkill -TERM -P "$executor" || true' TERM
trap 'pkill -INT -P "$executor" || true' INT
status=0
wait "$executor" || status=$?
# A trapped signal ends `wait` early; wait again until the executor itself has ended.
while kill -0 "$executor" 2>/dev/null; do
  status=0
  wait "$executor" || status=$?
done
exit "$status"
