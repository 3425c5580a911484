#!/usr/bin/env bash
# Build TaskVine (cctools) from a release source tarball into a venv: `make taskvine`.
#   deploy/build-taskvine.sh CCTOOLS_SRC VENV
# Installs into VENV/opt/cctools, puts its Python package on the venv's path (a .pth file)
# and vine_worker/vine_status on the venv's PATH (symlinks in VENV/bin). Needs gcc, make,
# swig and zlib's headers; installs the last two with apt-get when missing and allowed.
set -euo pipefail
src=$(readlink -f "$1")
venv=$(readlink -f "$2")
prefix="$venv/opt/cctools"
py="$venv/bin/python"
[ -f "$src" ] || { echo "build-taskvine: no cctools source tarball at $1 (set CCTOOLS_SRC=...)" >&2; exit 2; }
[ -x "$py" ] || { echo "build-taskvine: no venv at $venv (run make venv first)" >&2; exit 2; }

if ! command -v swig >/dev/null || [ ! -f /usr/include/zlib.h ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "build-taskvine: installing swig and zlib1g-dev (Debian packages)"
        apt-get install -y -q swig zlib1g-dev >/dev/null 2>&1 || \
            { apt-get update -q >/dev/null && apt-get install -y -q swig zlib1g-dev >/dev/null; }
    else
        echo "build-taskvine: needs swig and zlib headers: apt-get install swig zlib1g-dev" >&2
        exit 2
    fi
fi

# what ndcctools' Python code imports (conda_pack: by create_library_from_functions)
"$py" -m pip install -q cloudpickle threadpoolctl packaging psutil conda-pack

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar xzf "$src" -C "$work"
cd "$work"/cctools-*
mkdir -p dttools/test  # its test data is not in the trimmed tarball
base=$("$py" -c 'import sys; print(sys.base_prefix)')
./configure --prefix "$prefix" --with-python3-path "$base" \
    --without-system-makeflow --without-system-ftp-lite --without-system-chirp \
    --without-system-grow --without-system-parrot --without-system-doc --with-perl-path no \
    > "$work/configure.log" 2>&1 || { tail -30 "$work/configure.log" >&2; exit 1; }
make -j"$(nproc)" > "$work/make.log" 2>&1 || { tail -40 "$work/make.log" >&2; exit 1; }
make install > "$work/install.log" 2>&1 || { tail -20 "$work/install.log" >&2; exit 1; }

site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pkg=$(dirname "$(find "$prefix/lib" -type d -name ndcctools -path '*site-packages*' | head -1)")
echo "$pkg" > "$site/pcm-cctools.pth"
for tool in vine_worker vine_status; do
    ln -sf "$prefix/bin/$tool" "$venv/bin/$tool"
done
"$py" -c 'import ndcctools.taskvine as vine; print("build-taskvine: ndcctools.taskvine", vine.__file__)'
"$venv/bin/vine_worker" --version | head -1
