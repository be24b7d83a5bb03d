#!/usr/bin/env sh
# Prints the pip extra matching this machine's NVIDIA driver: cuda13, cuda12, or nothing when no
# driver answers. `make run` uses it to install the CuPy build the GPU can run.
v=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n1)
case "$v" in
  ""|[0-9]|1[01]) ;;
  12) echo cuda12 ;;
  *) echo cuda13 ;;
esac
