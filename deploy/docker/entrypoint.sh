#!/bin/sh
# Entrypoint of the worker image: applies the CLIP checkpoint baked in at build time (if any)
# unless the environment already chose, then runs the command. An empty IMGDEDUP_CLIP_CHECKPOINT
# would parse as the current directory, so the variable is only set when the file exists.
set -eu
baked=/opt/imgdedup/weights/clip-checkpoint
if [ -e "$baked" ]; then
  : "${IMGDEDUP_CLIP_CHECKPOINT:=$baked}"
  : "${IMGDEDUP_CLIP_ENABLED:=true}"
  export IMGDEDUP_CLIP_CHECKPOINT IMGDEDUP_CLIP_ENABLED
fi
exec "$@"
