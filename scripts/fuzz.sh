#!/usr/bin/env bash
# Runs fhirsync's fuzz targets (fuzz/, cargo-fuzz with libFuzzer on the
# nightly toolchain), each for SECONDS, two at a time, from seed corpora
# made of the official R4 examples, the FHIRPath test suite and the kept
# regression inputs (fuzz/regressions/). A crash, a timeout or an input
# that runs out of memory fails the run, and libFuzzer leaves the input in
# fuzz/artifacts/TARGET/: copy it to fuzz/regressions/TARGET/, fix the code
# until `cargo test -p fhirsync-fuzzing` passes, and keep it.
#
#   scripts/fuzz.sh [--seconds N] [--jobs J] [TARGET...]
#
# Default: every target, 60 s each. Without a nightly toolchain it says so
# and exits 0 (the regression inputs still run in `cargo test`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=60
jobs=2
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
# Every target fuzz/Cargo.toml declares, so a new one is never left out.
mapfile -t all < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -vx "fhirsync-fuzz")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain (rustup toolchain install nightly); skipped"
  exit 0
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

corpus="$root/.cache/fuzz/corpus"
if [ ! -f "$corpus/.complete" ]; then
  scripts/fetch-fhir-examples.sh >/dev/null
  python3 - "$corpus" "$root" <<'EOF'
import html, json, os, re, sys
corpus, root = sys.argv[1], sys.argv[2]
examples = os.path.join(root, ".cache/fhir-r4-examples")
def put(target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
suite = open(os.path.join(root, "crates/fhirsync-core/tests/fhirpath-r4/tests-fhir-r4.xml"), encoding="utf-8").read()
for i, e in enumerate(re.findall(r"<expression[^>]*>(.*?)</expression>", suite, re.S)):
    put("fhirpath", f"suite-{i}", html.unescape(e))
meta = {"url": "https://fhirsync.dev/fhir/StructureDefinition/sync-metadata", "extension": [
    {"url": "seq", "valueInteger64": "7"}, {"url": "origin", "valueString": "n1"},
    {"url": "vector", "valueString": "n1:3"}, {"url": "hlc", "valueString": "1"}]}
n = 0
for name in sorted(os.listdir(examples)):
    path = os.path.join(examples, name)
    if not name.endswith(".json") or os.path.getsize(path) > 64 * 1024:
        continue
    data = open(path, "rb").read()
    put("ingest", name, data)
    try:
        r = json.loads(data)
    except ValueError:
        continue
    if r.get("resourceType") == "Bundle" and r.get("type") in ("transaction", "batch"):
        put("bundle", name, data)
    if n % 10 == 0 and "id" in r:
        url = f"{r['resourceType']}/{r['id']}"
        put("change_record", name, json.dumps({"fullUrl": url, "resource": r,
            "request": {"method": "PUT", "url": url}, "extension": [meta]}))
    n += 1
for i, q in enumerate(["_id=a,b,c", "_lastUpdated=gt2026-01-01&_count=10", "identifier=urn:oid:1|123",
                       "patient=Patient/p1&_sort=-_lastUpdated", "subject=http://x/fhir/Patient/1",
                       "_summary=count&_total=accurate", "name=Otieno&gender=female"]):
    put("search", f"seed-{i}", q)
for i, name in enumerate(sorted(os.listdir(os.path.join(root, "fuzz/regressions/bulk_params")))):
    put("bulk_params", f"seed-{i}", open(os.path.join(root, "fuzz/regressions/bulk_params", name), "rb").read())
for i, name in enumerate(sorted(os.listdir(os.path.join(root, "fuzz/regressions/merge")))):
    put("merge", f"seed-{i}", open(os.path.join(root, "fuzz/regressions/merge", name), "rb").read())
open(os.path.join(corpus, ".complete"), "w").close()
EOF
fi

logs="$root/target/fuzz-logs"
mkdir -p "$logs"
(cd fuzz && cargo +nightly fuzz build -s none -O 2>&1 | tail -1)

run() {
  local t="$1"
  mkdir -p "$corpus/$t" "fuzz/regressions/$t"
  # New inputs go to the first corpus directory (.cache, not committed).
  (cd fuzz && cargo +nightly fuzz run -s none -O "$t" "$corpus/$t" "../fuzz/regressions/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1) \
      >"$logs/$t.log" 2>&1
}
failed=0
running=0
for t in "${targets[@]}"; do
  run "$t" &
  running=$((running + 1))
  if [ "$running" -ge "$jobs" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true
for t in "${targets[@]}"; do
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' || true)
  cov=$(grep -o 'cov: [0-9]*' "$logs/$t.log" | tail -1 || true)
  if grep -qE 'ERROR: libFuzzer|SUMMARY: libFuzzer|panicked|deadly signal' "$logs/$t.log"; then
    echo "fuzz: $t FAILED after ${runs:-?} runs:"
    grep -E 'panicked|ERROR|SUMMARY|Test unit written|artifact' "$logs/$t.log" | head -20
    failed=1
  else
    echo "fuzz: $t ok: ${runs:-?} runs in ${seconds} s, ${cov:-cov: ?}"
  fi
done
exit $failed
