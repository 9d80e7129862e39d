#!/usr/bin/env bash
# Developers, on the GPU machine (after prelude.sh): every arm of a comparison suite in its
# own process, all sharing the GPU, each stopped by SIGTERM after SECONDS (it saves and is
# reported as stopped), then one JSON summary in $OUT.
#   bash scripts/device/parallel_arms.sh configs/compare/mqar.py:512 3000 520 seed0 [ARM ...]
# STEPS overrides run.train.steps; TAG names the workdir (/tmp/runs/<suite>_<TAG>) and the
# summary ($OUT/<suite>_<TAG>.json: each arm's loss curve, median step and input-wait
# times, its compare.json and the tail of its log). Extra --config overrides for every
# arm: ARM_OVERRIDES="--seeds 1 --config.run.train.warmup_steps=500" (with --seeds, the summary
# has one entry per seed's workdir). Two calls may share a TAG (one workdir, one table) when
# each sets its own PART, which names its summary ($OUT/<suite>_<TAG>_<PART>.json).
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the arms share the GPU: no process may take most of it up front
suite=$1; steps=$2; seconds=$3; tag=$4; shift 4
arms=${*:-dense window masformer gated dma routing sse_h gla_h}
name=$(basename "${suite%%:*}" .py)_$(echo "${suite#*:}" | tr -c 'a-zA-Z0-9\n' _)
[ "$suite" = "${suite%%:*}" ] && name=$(basename "$suite" .py)
workdir=/tmp/runs/${name}_$tag
mkdir -p "$workdir/logs" "${OUT:-/tmp/out}"
for arm in $arms; do
  # shellcheck disable=SC2086
  timeout -s TERM "$seconds" python -m sparseformer.cli.compare --config "$suite" --workdir "$workdir" \
    --arms "$arm" --config.run.train.steps="$steps" --config.run.data.workers=2 ${ARM_OVERRIDES:-} \
    > "$workdir/logs/$arm${PART:+.$PART}.log" 2>&1 &
done
wait
python - "$workdir" "${OUT:-/tmp/out}/${name}_$tag${PART:+_$PART}.json" "${PART:+.$PART}" $arms <<'PY'
import glob, json, statistics, sys
workdir, out, part, arms = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
summary = {}
for arm in arms:
  with open(f'{workdir}/logs/{arm}{part}.log') as f:
    log_tail = f.read().splitlines()[-15:]
  runs = sorted(glob.glob(f'{workdir}/{arm}') + glob.glob(f'{workdir}/{arm}.seed*')) or [f'{workdir}/{arm}']
  for run_dir in runs:  # the arm's workdir per seed (compare --seeds: <arm>.seed<S>)
    key = run_dir.rsplit('/', 1)[-1]
    records = []
    for path in glob.glob(f'{run_dir}/metrics.jsonl'):
      with open(path) as f:
        records += [json.loads(line) for line in f if line.strip()]
    losses = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
    every = max(1, len(losses) // 12)
    median = lambda name: statistics.median([r[name] * 1e3 for r in records if name in r] or [float('nan')])
    try:
      with open(f'{run_dir}/compare.json') as f:
        compare = json.load(f)
    except OSError:
      compare = None
    summary[key] = {'loss': losses[::every] + losses[-1:], 'step_ms_median': median('train/step_time'),
                    'data_ms_median': median('train/data_time'), 'compare': compare, 'log_tail': log_tail}
    curve = ', '.join(f'{s}: {l:.3f}' for s, l in summary[key]['loss'])
    print(f'{key}: step {summary[key]["step_ms_median"]:.1f} ms, data {summary[key]["data_ms_median"]:.2f} ms; '
          f'loss {curve}')
with open(out, 'w') as f:
  json.dump({'workdir': workdir, 'arms': summary}, f, indent=1)
print('wrote', out)
PY
