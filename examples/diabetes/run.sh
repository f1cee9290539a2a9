#!/usr/bin/env bash
# The diabetes consortium (a regression) in one command: three clinics on a local devnet.
# Makes the CSV files from sklearn's bundled data, then runs examples/consortium.py on them.
# Clinic B's patients pull the model away from the validation set's, so its update is left out
# of every round (negative_contribution); the two left are below the default min_aggregated of
# 3, which would fail every round. This example accepts a model of two updates knowingly:
# each of the two clinics could recover the other's update from the two public models.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python "$here/make_data.py" "$here/data"
python "$here/../consortium.py" "$here/spec.toml" --validation "$here/data/validation.csv" \
    --data "$here/data/clinic_a.csv" \
    --data "$here/data/clinic_b.csv" \
    --data "$here/data/clinic_c.csv" \
    --rounds "${ROUNDS:-10}" --work-dir "$here/.run" --set min_aggregated=2
