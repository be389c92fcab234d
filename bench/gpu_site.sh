# Sourced by the bench scripts on the GPU machine: `. bench/gpu_site.sh USE` makes ready the pack USE that
# bench/gpu_pack.py built here (every part carried in this call or stashed by earlier calls to the same warm
# machine, each file's sha256 checked; otherwise one line naming the missing parts, and the script exits),
# installs its wheels into /tmp/site once, unpacks its shared.tar (../shared folders) and exports:
#   PACK (the assembled pack), SHARED (where the ../shared folders are), PYTHONPATH=/tmp/site:$PWD.
# The calls that reproduce a run: `python bench/gpu_pack.py calls USE` here.
gpu_site() {
  local use=$1 pack stamp
  pack=$(python3 bench/gpu_pack.py ready "$use") || return 1
  stamp=/tmp/site/.gpu-pack-$use-$(sha256sum "$pack/manifest.json" | cut -c1-16)
  if [ -d "$pack/wheels" ] && [ ! -f "$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$pack"/wheels/*.whl || return 1
    touch "$stamp"
  fi
  if compgen -G "$pack/wheels/bitsandbytes-*.whl" > /dev/null; then  # the pack keeps CUDA 13's libraries only
    local cuda
    cuda=$(python3 -c "import torch; print((torch.version.cuda or 'none').replace('.', ''))")
    [ -f "/tmp/site/bitsandbytes/libbitsandbytes_cuda$cuda.so" ] || { echo "gpu_site: torch here is built for" \
      "CUDA $cuda, and the pack's bitsandbytes has no library for it: widen BNB_KEEP in bench/gpu_pack.py"; return 1; }
  fi
  if [ -f "$pack/shared.tar" ]; then
    [ -d "$pack/shared" ] || { mkdir -p "$pack/shared.tmp" && tar xf "$pack/shared.tar" -C "$pack/shared.tmp" \
      && mv "$pack/shared.tmp" "$pack/shared"; } || return 1
    SHARED=$pack/shared
    [ -e ../shared ] || ln -s "$SHARED" ../shared 2>/dev/null || true
  fi
  PACK=$pack
  export PACK SHARED PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  case ":$PYTHONPATH:" in *":$PWD:"*) ;; *) PYTHONPATH=$PYTHONPATH:$PWD ;; esac
}
gpu_site "$@" || exit 1
