#!/bin/sh
# Every issue-14 target figure on a quiet machine: three `fleetpush bench` runs,
# one after the other (never in parallel: they would measure each other).
# Usage: scripts/bench_targets.sh [OUTDIR]   (default: ./bench-results)
# Takes about 30 minutes on the 2-core VM (e2e ~12, fan-out ~12, delta ~4-6);
# needs ~30 GB free under $TMPDIR
# (1000 x 10 MiB fan-out twice, 1 GiB releases). rsync and nginx are optional:
# without them vs_rsync / vs_http are absent and 'skipped' says why.
set -eu
out=${1:-bench-results}
mkdir -p "$out"
fp=${FLEETPUSH:-fleetpush}
# 1 GiB end to end and the download phase alone, sha256 and blake3, with the
# ceilings, rsync+fsync and nginx->curl+sha256 in the same rounds; publish
# (indexing) time of the 1 GiB release.
$fp bench --size 1GiB --rounds 5 --compare --scenarios download,e2e,index --json "$out/e2e.json"
# Fan-out: 1000 devices x 10 MiB against a raw 1000-connection baseline, and
# push latency to 1000 connected devices.
$fp bench --size 64MiB --rounds 3 --scenarios fanout --devices 1000 --fanout-size 10MiB --json "$out/fanout.json"
# Delta scenarios at the sizes (256 MiB, 64 MiB, 1 GiB, re-publish),
# bytes on the wire counted by the bench's relay; 1% of 1 GiB against rsync.
$fp bench --size 64MiB --rounds 1 --compare --scenarios delta --json "$out/delta.json"
echo "results in $out/"
