# Source on the GPU machine (no network, no pip installs from an index): puts the checkout, the carried
# grpc health/reflection wheels and (with FLASH_ATTN=1) the prebuilt flash-attn on PYTHONPATH.
#   carry: shard_server/pb (generated stubs; no grpcio-tools there) and .gpu (wheels + flash-attn tarball)
export PYTHONPATH="$PWD"
if [ -d .gpu/wheels ]; then
  mkdir -p /tmp/gpu-wheels
  python3 -m pip install -q --no-deps --no-index --target /tmp/gpu-wheels .gpu/wheels/*.whl >/dev/null 2>&1
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu-wheels"
fi
if [ "${FLASH_ATTN:-0}" = 1 ] && ls .gpu/flash_attn-*.tar.xz >/dev/null 2>&1; then
  mkdir -p /tmp/fa && [ -d /tmp/fa/flash_attn ] || tar xJf .gpu/flash_attn-*.tar.xz -C /tmp/fa
  export PYTHONPATH="$PYTHONPATH:/tmp/fa"
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
