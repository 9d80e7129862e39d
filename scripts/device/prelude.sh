# Sourced at the start of a GPU-machine command (see wheels.sh): installs .whl/ into
# /tmp/site once per machine (again when the wheel list changes), unpacks the HEAD
# snapshot .gpu/src.tar into /tmp/src (so edits made here while a run is in flight do not
# leak into it) and enters it.
if [ "$(ls .whl)" != "$(cat /tmp/site/.installed 2>/dev/null)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && ls .whl > /tmp/site/.installed || return 1
fi
rm -rf /tmp/src && mkdir -p /tmp/src && tar -xf .gpu/src.tar -C /tmp/src || return 1
export PYTHONPATH=/tmp/src:/tmp/site PYTHONUNBUFFERED=1
# The machine's HOME gives triton no cache directory ("Could not create or locate cache
# dir" from fla's kernels): give it one.
export TRITON_CACHE_DIR=/tmp/triton_cache
# fla's autotuners ask triton to cache their results on disk, which still fails there:
# autotune in memory.
export FLA_CACHE_RESULTS=0
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd /tmp/src
