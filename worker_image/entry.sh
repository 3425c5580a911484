#!/usr/bin/env bash
# Glidein payload: activate the worker environment, pick the assigned GPU, run `pcm worker`,
# forward SIGTERM (HTCondor eviction/removal) so the worker drains, exit with its status.
# `pcm worker` asks the service first: with `pcm serve --executor taskvine` it runs
# vine_worker against the service's TaskVine manager instead of PCM's agent.
#   entry.sh SERVICE_URL [pcm worker flags: --glidein-id C.P --token-file F ...]
# Environment (from the factory config's htcondor.environment, never secrets):
#   PCM_VENV        a prebuilt venv on a shared filesystem, or
#   PCM_IMAGE       an Apptainer image (worker_image/pcm-worker.def), or
#   PCM_ENV=packed  the service's packed environment (`pcm serve --worker-env`), fetched from
#                   peers and the service by bootstrap.py (transferred beside this script) and
#                   unpacked into PCM_ENV_CACHE (a node-local directory the site keeps) or the
#                   job's scratch directory; or none of these: `pcm` on PATH.
set -euo pipefail
service=${1:?usage: entry.sh SERVICE_URL [pcm worker flags]}
shift

scratch=${_CONDOR_SCRATCH_DIR:-$PWD}
# HTCondor leaves HOME empty; libraries write caches under it
if [ -z "${HOME:-}" ] || [ ! -w "${HOME}" ]; then export HOME=$scratch; fi
# HTCondor assigns GPUs by id; CUDA_VISIBLE_DEVICES normally holds them already (10000 = none)
if [ -n "${_CONDOR_AssignedGPUs:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
  export CUDA_VISIBLE_DEVICES=$_CONDOR_AssignedGPUs
fi
# glidein id "cluster.proc" from the job ad when the factory did not pass --glidein-id
if [ -z "${PCM_GLIDEIN_ID:-}" ] && [ -n "${_CONDOR_JOB_AD:-}" ] && [ -r "$_CONDOR_JOB_AD" ]; then
  c=$(awk -F' = ' '$1 == "ClusterId" {print $2}' "$_CONDOR_JOB_AD")
  p=$(awk -F' = ' '$1 == "ProcId" {print $2}' "$_CONDOR_JOB_AD")
  [ -n "$c" ] && export PCM_GLIDEIN_ID="$c.$p"
fi

if [ "${PCM_ENV:-}" = packed ]; then
  boot=$scratch/bootstrap.py
  [ -r "$boot" ] || boot=$(dirname "$0")/bootstrap.py
  # the worker flags hold --token-file/--ca-file: the bootstrap reads the same files
  token=""; ca=""; prev=""
  for a in "$@"; do
    [ "$prev" = --token-file ] && token=$a
    [ "$prev" = --ca-file ] && ca=$a
    prev=$a
  done
  cmd=(python3 "$boot" --service "$service" --work-dir "$scratch/pcm-worker" ${token:+--token-file "$token"}
       ${ca:+--ca-file "$ca"} -- -m pcm_service.cli worker)
elif [ -n "${PCM_IMAGE:-}" ]; then
  cmd=(apptainer exec --nv --bind "$scratch" "$PCM_IMAGE" pcm worker)
elif [ -n "${PCM_VENV:-}" ]; then
  cmd=("$PCM_VENV/bin/pcm" worker)
else
  cmd=(pcm worker)
fi

echo "glidein ${PCM_GLIDEIN_ID:-?} on $(hostname) gpus=${_CONDOR_AssignedGPUs:-none}: ${cmd[*]}" >&2
"${cmd[@]}" --service "$service" --work-dir "$scratch/pcm-worker" "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
set +e
wait "$child"; rc=$?
if [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; then  # a trapped signal ended the first wait
  wait "$child"; rc=$?
fi
exit "$rc"
