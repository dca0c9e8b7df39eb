#!/usr/bin/env bash
# What produced this directory's logs (fifth session, one H200, commit ebf7e4e): the previous session's plan,
# run as written (the offline run and concurrency 256 did not fit in the device time). Its step_profile.py is
# this directory's (since given the window tables the batcher now needs).
#
#   bash docs/bench/2026-12-01-h200-paged/run.sh /tmp/res
exec bash "$(dirname "$0")/../2026-12-01-h200-serve/next.sh" "$@"
