#!/usr/bin/env bash
# The diabetes consortium (a regression) in one command: three clinics on a local devnet.
# Makes the CSV files from sklearn's bundled data, then runs examples/consortium.py on them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python "$here/make_data.py" "$here/data"
python "$here/../consortium.py" "$here/spec.toml" --validation "$here/data/validation.csv" \
    --data "$here/data/clinic_a.csv" \
    --data "$here/data/clinic_b.csv" \
    --data "$here/data/clinic_c.csv" \
    --rounds "${ROUNDS:-10}" --work-dir "$here/.run"
