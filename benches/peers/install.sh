#!/usr/bin/env bash
# The peer stream processors of benches/peers.py in a venv of their own (benches/.venv-peers by
# default): apache-flink pulls in apache-beam, which pins pyarrow 16.1, so they cannot share the
# project's .venv (duckdb and a current pyarrow).
#
#   bash benches/peers/install.sh            # PEERS_VENV=/elsewhere to put the venv elsewhere
#
# Installs the four peers in one pip resolution (installed one after another, pathway's
# grpcio/protobuf/cloudpickle upgrades break apache-beam's pins), every package pinned by
# benches/peers/constraints.txt when present, and prints the install time and each peer's size,
# counted from the files each wheel's RECORD lists:
#   own MB        the peer's own distribution(s);
#   exclusive MB  own + the dependencies no other peer needs (what uninstalling it would free);
#   alone MB      own + every package it needs, transitively (about its size installed alone;
#                 a dependency shared with another peer is counted in both).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${PEERS_VENV:-$REPO/benches/.venv-peers}"
PY="${PYTHON:-python3}"
PEERS=(apache-flink==2.3.0 pathway==0.33.0 bytewax==0.21.1 polars==2.1.0)

if ! command -v java >/dev/null; then    # PyFlink runs its mini-cluster in a JVM
    apt-get update && apt-get install -y openjdk-17-jre-headless
fi

start=$(date +%s)
"$PY" -m venv --clear "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
CONSTRAINTS=()
[ -s "$HERE/constraints.txt" ] && CONSTRAINTS=(-c "$HERE/constraints.txt")

t=$(date +%s.%N)
"$VENV/bin/pip" install -q "${CONSTRAINTS[@]}" "${PEERS[@]}" pyarrow
echo "pip install of ${PEERS[*]}: $(printf '%.0f' "$(echo "$(date +%s.%N) - $t" | bc)") s"
echo "total: $(( $(date +%s) - start )) s, venv $(du -sm "$VENV" | cut -f1) MB ($VENV)"

"$VENV/bin/python" - "${PEERS[@]}" <<'PY'
import re, sys
from importlib import metadata

def norm(n): return re.sub(r"[-_.]+", "-", n).lower()
dists = {norm(d.metadata["Name"]): d for d in metadata.distributions()}

def size(d):
    total = 0
    for f in d.files or []:
        try:
            total += f.locate().stat().st_size
        except OSError:
            pass
    return total

def closure(name):
    seen, todo = set(), [norm(name)]
    while todo:
        n = todo.pop()
        if n in seen or n not in dists:
            continue
        seen.add(n)
        for req in dists[n].requires or []:
            if "extra ==" in req:      # optional extras are not installed by a plain pip install
                continue
            todo.append(norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen

names = [norm(spec.split("==")[0]) for spec in sys.argv[1:]]
closures = {n: closure(n) for n in names}
print(f"{'peer':16} {'own MB':>7} {'exclusive MB':>13} {'alone MB':>9}  biggest dependencies (MB)")
for name in names:
    deps = closures[name]
    others = set().union(*(c for n, c in closures.items() if n != name))
    own = [n for n in deps if n == name or n == name + "-libraries"]
    mine = [n for n in deps if n not in others]
    big = sorted(((size(dists[n]), n) for n in deps if n not in own), reverse=True)[:4]
    mb = lambda ns: sum(size(dists[n]) for n in ns) / 1e6
    print(f"{name:16} {mb(own):7.0f} {mb(mine):13.0f} {mb(deps):9.0f}  "
          + ", ".join(f"{n} {s / 1e6:.0f}" for s, n in big))
PY
