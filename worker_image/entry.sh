#!/usr/bin/env bash
# Glidein payload: activate the worker environment, pick the assigned GPU, run the agent,
# forward SIGTERM (HTCondor eviction) so the worker drains, and exit with its status.
#   entry.sh SERVICE_URL [extra `pcm worker` flags...]
# Environment: PCM_VENV (a prebuilt venv on a shared path) or PCM_IMAGE (an Apptainer image).
set -euo pipefail
service=${1:?usage: entry.sh SERVICE_URL [pcm worker flags]}
shift

# HTCondor sets CUDA_VISIBLE_DEVICES to the GPUs it assigned (10000 means none).
if [ -n "${_CONDOR_AssignedGPUs:-}" ] && [ -z "${CUDA_VISIBLE_DEVICES:-}" ]; then
  export CUDA_VISIBLE_DEVICES=$_CONDOR_AssignedGPUs
fi
export PCM_GLIDEIN_ID=${PCM_GLIDEIN_ID:-${_CONDOR_JOB_AD:+$(awk -F' = ' '/^GlobalJobId/ {gsub(/"/,"",$2); print $2}' "$_CONDOR_JOB_AD")}}

if [ -n "${PCM_IMAGE:-}" ]; then
  cmd=(apptainer exec --nv --cleanenv "$PCM_IMAGE" pcm worker)
elif [ -n "${PCM_VENV:-}" ]; then
  cmd=("$PCM_VENV/bin/pcm" worker)
else
  cmd=(pcm worker)
fi

"${cmd[@]}" --service "$service" --work-dir "${_CONDOR_SCRATCH_DIR:-$PWD}/pcm-worker" "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM INT
wait "$child" || true   # returns early when a trapped signal arrives
wait "$child"
