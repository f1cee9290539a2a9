#!/usr/bin/env bash
# The breast-cancer consortium in one command: three hospitals on a local devnet, ten rounds.
# Makes the CSV files from sklearn's bundled data, then runs examples/consortium.py on them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python "$here/make_data.py" "$here/data"
python "$here/../consortium.py" "$here/spec.toml" --validation "$here/data/validation.csv" \
    --data "$here/data/hospital_a.csv" \
    --data "$here/data/hospital_b.csv" \
    --data "$here/data/hospital_c.csv" \
    --rounds "${ROUNDS:-10}" --work-dir "$here/.run"
