#!/usr/bin/env bash
# Type-checks configs/grafana/streamsrv.json against Grafana's own dashboard model (the npm
# package @grafana/schema, the types Grafana's frontend is built with). Needs node and npm; not
# part of `make test` (tests/test_grafana.py checks the metrics and the layout there).
#   scripts/check-grafana.sh [WORKDIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
cd "$work"
[ -f package.json ] || npm init -y >/dev/null
[ -d node_modules/@grafana/schema ] || npm install --silent @grafana/schema typescript
python3 - "$root/configs/grafana/streamsrv.json" > check.ts <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for key in [k for k in d if k.startswith("__")]:  # __inputs, __requires: import-time only
    del d[key]
text = json.dumps(d, indent=1)
# the model's enums are TypeScript enums: their JSON values are written as the members
text = text.replace('"mode": "absolute"', '"mode": ThresholdsMode.Absolute')
print("import { type Dashboard, ThresholdsMode } from"
      " './node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.js';")
print(f"const d: Dashboard = {text};\nexport default d;")
PY
npx tsc --noEmit --strict --skipLibCheck --module nodenext --moduleResolution nodenext check.ts
echo "configs/grafana/streamsrv.json matches @grafana/schema $(node -p 'require("@grafana/schema/package.json").version')"
